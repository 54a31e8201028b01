"""The idemproxy benchmark: `python -m bench`."""
