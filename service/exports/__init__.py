"""Exports (adapter merged into its base) and offline blends: Operation rows run as Ray Jobs."""
