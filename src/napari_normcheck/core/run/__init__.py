"""A run: reading tiles, the forwards in both modes, stitching, the tile loop, progress and timing, the single-process and distributed runs, the report."""
