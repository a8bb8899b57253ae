"""attnedit's version (a leaf module: what records provenance imports it without the whole package)."""

__version__ = "0.1.0"
