"""Checkpoint files: where models come from, the manifest and load-time checks, atomic output folders, save and load."""
