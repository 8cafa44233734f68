"""Volumes by URL in napari: open a zarr / OME-Zarr by URL as a lazy layer, and read such a layer by URL.

A layer whose source is a URL (``layer.source.path``, set by napari when a reader opened it, or by
:func:`add_url_layer`) is read by the check through
:func:`~napari_normcheck.core.io.volume.open_volume` with that URL: chunk by chunk, with the core's
retries and cache, and the report records the URL. Other layers are read from their array data.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QHBoxLayout, QLineEdit, QPushButton, QWidget  # noqa: TID253

from napari_normcheck.core.base.errors import NormcheckError

#: Layer metadata: the URL the layer was opened from and its fsspec storage options.
URL_KEY = "normcheck_url"
OPTIONS_KEY = "normcheck_storage_options"
#: Most pyramid levels looked for in an OME-Zarr image.
MAX_LEVELS = 16


def layer_url(layer: Any) -> str | None:
    """The URL a layer was opened from (its source path, else our metadata), or ``None``."""
    from napari_normcheck.core.io.remote import is_url

    path = getattr(getattr(layer, "source", None), "path", None)
    if is_url(path):
        return str(path)
    url = layer.metadata.get(URL_KEY)
    return str(url) if is_url(url) else None


def open_layer_volume(layer: Any, level: int) -> Any:
    """The volume the check reads for ``layer`` at pyramid ``level`` (raises ``NormcheckError``).

    By URL when the layer came from one (lazily, with retries and a cache), else its array data.
    """
    from napari_normcheck.core.io.volume import open_volume

    url = layer_url(layer)
    if url is not None:
        options = layer.metadata.get(OPTIONS_KEY) or None
        return open_volume(url, level=level, storage_options=options)
    data = layer.data[level] if layer.multiscale else layer.data
    return open_volume(data, channel_axis=-1 if layer.rgb else "auto")


def url_layer_data(url: str, storage_options: dict | None = None) -> tuple[Any, dict]:
    """The lazy data and keyword arguments of an image layer for the zarr / OME-Zarr at ``url``.

    Only metadata is fetched here; napari fetches the chunks it shows. Every level of an OME-Zarr
    pyramid becomes a level of a multiscale layer; channels (when more than one) are the first axis.
    """
    from napari_normcheck.core.io.volume import open_volume

    volumes = [open_volume(url, storage_options=storage_options)]
    while len(volumes) < MAX_LEVELS:
        try:
            volumes.append(open_volume(url, level=len(volumes), storage_options=storage_options))
        except NormcheckError:  # no such level (or a plain array): the pyramid ends here
            break
    first = volumes[0]
    flat = first.spatial_ndim == 2

    def layer_array(volume: Any) -> Any:
        data = volume.data[:, 0] if flat else volume.data
        return data[0] if volume.data.shape[0] == 1 else data

    levels = [layer_array(volume) for volume in volumes]
    scale = first.scale[1:] if flat else first.scale
    translate = first.translation[1:] if flat else first.translation
    if first.data.shape[0] > 1:
        scale, translate = (1.0, *scale), (0.0, *translate)
    name = url.rstrip("/").rsplit("/", 1)[-1] or url
    kwargs = {
        "name": name,
        "scale": scale,
        "translate": translate,
        "multiscale": len(levels) > 1,
        "metadata": {URL_KEY: url, OPTIONS_KEY: storage_options or {}},
    }
    return (levels if len(levels) > 1 else levels[0]), kwargs


def add_url_layer(viewer: Any, url: str, storage_options: dict | None = None) -> Any:
    """Open ``url`` as a lazy image layer of ``viewer`` whose source path is the URL."""
    data, kwargs = url_layer_data(url, storage_options)
    return add_opened(viewer, url, data, kwargs)


def add_opened(viewer: Any, url: str, data: Any, kwargs: dict) -> Any:
    """Add the layer of :func:`url_layer_data` (GUI thread), its source path the URL."""
    from napari.layers._source import layer_source

    with layer_source(path=url):
        return viewer.add_image(data, **kwargs)


class UrlOpenRow(QWidget):
    """A URL field, storage options (JSON) and Open: the volume comes as a lazy layer.

    The metadata is fetched in a worker thread; errors are napari notifications.
    """

    def __init__(self, viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.worker: Any = None
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        self.url_edit = QLineEdit()
        self.url_edit.setPlaceholderText("https://… or s3://… zarr / OME-Zarr")
        self.url_edit.setToolTip(
            "open a zarr array or OME-Zarr image by URL as a lazy layer: only the chunks shown or "
            "checked are fetched"
        )
        self.url_edit.returnPressed.connect(self.open)
        self.options_edit = QLineEdit()
        self.options_edit.setPlaceholderText("storage options (JSON)")
        self.options_edit.setToolTip('fsspec options, e.g. {"anon": true} or an endpoint_url')
        self.open_button = QPushButton("Open URL…")
        self.open_button.clicked.connect(self.open)
        row.addWidget(self.url_edit, 3)
        row.addWidget(self.options_edit, 1)
        row.addWidget(self.open_button)

    def open(self) -> Any:
        """Open the URL in a worker thread; returns the worker (``None`` on a form error)."""
        from napari.qt.threading import thread_worker
        from napari.utils.notifications import show_error

        from napari_normcheck.core.io.remote import is_url, parse_storage_options

        url = self.url_edit.text().strip()
        try:
            if not is_url(url):
                raise NormcheckError(f"not a URL: {url!r}; type http(s)://… or s3://…")
            options = parse_storage_options(self.options_edit.text().strip() or None)
        except NormcheckError as error:
            show_error(str(error))
            return None

        def fetch() -> Any:
            try:
                return url_layer_data(url, options)
            except NormcheckError as error:
                return error

        worker = thread_worker(fetch, start_thread=False)()
        worker.returned.connect(lambda result: self._on_opened(url, result))
        worker.finished.connect(lambda: self.open_button.setEnabled(True))
        self.open_button.setEnabled(False)
        self.worker = worker
        worker.start()
        return worker

    def _on_opened(self, url: str, result: Any) -> None:
        from napari.utils.notifications import show_error

        if isinstance(result, NormcheckError):
            show_error(str(result))
            return
        add_opened(self.viewer, url, *result)
