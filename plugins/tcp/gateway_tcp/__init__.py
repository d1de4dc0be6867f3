"""Generic TCP protocol plugin."""
