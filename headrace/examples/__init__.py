"""End-to-end examples on real public ad data (``headrace example NAME``)."""
