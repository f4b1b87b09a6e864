"""The package version (also recorded per plugin in checkpoints)."""

__version__ = "0.1.0"
