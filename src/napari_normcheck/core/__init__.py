"""The Qt-free compute core: volumes, tiling, normalization modes, the two-pass engine and metrics.

Nothing in this package imports napari, qtpy, magicgui or a Qt binding.
"""
