"""The package version (one place; `fasq.__version__` and checkpoint fingerprints read it)."""

__version__ = "0.1.0"
