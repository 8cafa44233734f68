"""Reading volumes lazily and writing OUT.zarr: volumes, intensity normalization, the store and its pyramids, the writer thread."""
