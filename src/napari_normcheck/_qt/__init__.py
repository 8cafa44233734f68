"""The Qt side of napari-normcheck: the dock widget and its tables."""
