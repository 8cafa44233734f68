"""The bottom: errors, the run configuration, normalization modes and the tile plan (pure, no I/O)."""
