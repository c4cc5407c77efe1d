"""Headrace: a Kafka stream-processing feature platform for ad CTR prediction."""

__all__ = ["__version__"]
__version__ = "0.1.0"
