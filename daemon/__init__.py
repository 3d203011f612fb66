"""flywatch: keeps Fly.io apps healthy, region by region."""

__version__ = "0.1.0"
