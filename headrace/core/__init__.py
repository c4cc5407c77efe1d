"""The ground floor: errors, settings, time parsing and the one Redis layer.

Nothing here imports any other Headrace package; every other package may import it.
"""
