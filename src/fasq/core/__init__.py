"""Configs, the storage format, the reference ops and the `PQLinear` module."""
