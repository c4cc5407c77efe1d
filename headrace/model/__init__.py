"""The model contract between training and serving: artifact folders, the champion
pointer, the cold-start model and LightGBM's category codes.

Imports only :mod:`headrace.core`; :mod:`offline` writes what this describes and
:mod:`serving` reads it, and neither imports the other.
"""
