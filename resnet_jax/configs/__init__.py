"""Experiment presets: one file per preset, each defining `get_config()`."""
