"""Drift monitoring: the statistics (PSI, binned Kolmogorov–Smirnov) and the model's
reference profile of its training data, which training writes and the monitor reads.
"""

__all__ = ["profile", "stats"]
