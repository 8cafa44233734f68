"""napari-normcheck: train/eval normalization disparity of segmentation networks, tile by tile.

Importing the package loads neither Qt, napari nor torch; the heavy parts live in
:mod:`napari_normcheck.core` (compute) and :mod:`napari_normcheck._qt` (widget).
"""

__version__ = "0.1.0"
