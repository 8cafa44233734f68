"""Every user error of the measurements issue, made through the widget, is a napari notification.

The notification carries the core's specific message (not a traceback dialog), the run never
starts or stops cleanly, and the form is usable again afterwards.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_normcheck._qt.region import SHAPES_BOX
from napari_normcheck._qt.widget import NormcheckWidget

from .conftest import ARCH_KWARGS, fill_model


@pytest.fixture
def notifications():
    """napari notifications dispatched during the test (message, severity, class name)."""
    from napari.utils.notifications import notification_manager

    seen = []

    def record(event):
        note = event if hasattr(event, "message") else event.value
        seen.append(note)

    notification_manager.notification_ready.connect(record)
    yield seen
    notification_manager.notification_ready.disconnect(record)


def _nan_image(image):
    image = image.copy()
    image[3, 10, 11] = np.nan
    image[5, 0, 0] = np.nan
    return image


def _inf_image(image):
    image = image.copy()
    image[2, 4, 4] = np.inf
    return image


def _two_channel_image(image):
    return np.stack([image, image])


def _five_d_image(image):
    return image[None, None]


def _corrupt_model(widget, tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"this is not a torch file" * 10)
    widget.model_path.setText(str(path))


def _untrusted_pickle(widget, tmp_path):
    from monai.networks.nets import BasicUNet

    path = tmp_path / "whole_model.pt"
    torch.save(BasicUNet(**ARCH_KWARGS), path)
    widget.model_path.setText(str(path))
    widget.arch.setText("")
    widget.arch_kwargs.setText("")


def _mismatched_state_dict(widget, _tmp_path):
    widget.arch_kwargs.setText(json.dumps({**ARCH_KWARGS, "norm": "instance"}))


def _box_outside(widget, _tmp_path):
    widget.viewer.add_shapes([[[500, 500], [600, 600]]], shape_type="rectangle", name="far box")
    widget.region_combo.setCurrentText(SHAPES_BOX)
    widget.shapes_combo.setCurrentText("far box")


def _no_box_layer(widget, _tmp_path):
    widget.region_combo.setCurrentText(SHAPES_BOX)


def _existing_other_folder(widget, tmp_path):
    folder = tmp_path / "someone_elses.zarr"
    folder.mkdir()
    (folder / "data.txt").write_text("keep me")
    widget.out_path.setText(str(folder))
    widget.overwrite.setChecked(True)


def _output_under_a_file(widget, tmp_path):
    (tmp_path / "a_file").write_text("")
    widget.out_path.setText(str(tmp_path / "a_file" / "out.zarr"))


CASES = {
    # case: (change to the image, change to the form, words the notification must hold)
    "missing model file": (
        None,
        lambda w, t: w.model_path.setText(str(t / "gone.pt")),
        "not found",
    ),
    "corrupt model file": (None, _corrupt_model, "corrupt.pt"),
    "untrusted pickle": (None, _untrusted_pickle, "trust"),
    "state_dict keys": (None, _mismatched_state_dict, "keys"),
    "unknown architecture": (
        None,
        lambda w, t: w.arch.setText("monai.networks.nets.NoSuchNet"),
        "NoSuchNet",
    ),
    "invalid JSON kwargs": (None, lambda w, t: w.arch_kwargs.setText("{not json"), "JSON"),
    "tile not divisible": (None, lambda w, t: w.tile.setText("16,30,30"), "divisible"),
    "tile not numbers": (None, lambda w, t: w.tile.setText("a,b"), "tile"),
    "tile below one": (None, lambda w, t: w.tile.setText("0,32,32"), "tile"),
    "NaN in the data": (_nan_image, None, "NaN"),
    "Inf in the data": (_inf_image, None, "Inf"),
    "channel count": (_two_channel_image, None, "channel"),
    "number of dimensions": (_five_d_image, None, "(5D); supported"),
    "box outside the volume": (None, _box_outside, "does not overlap the image"),
    "no box layer": (None, _no_box_layer, "Shapes layer"),
    "bad input normalization": (
        None,
        lambda w, t: w.normalize.setText("percentile:abc"),
        "percentile",
    ),
    "output folder of another program": (None, _existing_other_folder, "normcheck"),
    "output not writable": (None, _output_under_a_file, "a_file"),
}


#: Found tile by tile once the run has started (the store and its layers then exist, partly empty).
FOUND_WHILE_RUNNING = ("NaN in the data", "Inf in the data")


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_a_notification(
    case, make_napari_viewer, qtbot, small_image, tiny_model_file, tmp_path, notifications
):
    from napari.utils.notifications import NotificationSeverity

    image_change, form_change, words = CASES[case]
    viewer = make_napari_viewer()
    image = image_change(small_image) if image_change else small_image
    viewer.add_image(image, name="img")
    widget = NormcheckWidget(viewer)
    fill_model(widget, tiny_model_file)
    widget.tile.setText("16,32,32")
    widget.device.setCurrentText("cpu")
    widget.out_path.setText(str(tmp_path / "out.zarr"))
    if form_change:
        form_change(widget, tmp_path)
    widget.run()
    qtbot.waitUntil(lambda: widget.settled, timeout=60_000)

    errors = [n for n in notifications if n.severity == NotificationSeverity.ERROR]
    assert len(errors) == 1, [n.message for n in notifications]
    note = errors[0]
    assert words.lower() in note.message.lower(), note.message
    # A plain notification with the message: no exception attached, so no traceback dialog.
    assert type(note).__name__ == "Notification"
    assert "Traceback" not in note.message and len(note.message.splitlines()) == 1
    # The form is usable again and nothing claims a result.
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert widget.finished_event is None
    assert widget.status_label.text().startswith("error:")
    if case not in FOUND_WHILE_RUNNING:
        # Refused before the store existed: no empty result layers are left behind.
        assert not any("normcheck_output" in layer.metadata for layer in viewer.layers)
    if case == "output folder of another program":
        assert (tmp_path / "someone_elses.zarr" / "data.txt").read_text() == "keep me"


def test_no_image_layer_is_a_notification(make_napari_viewer, notifications):
    widget = NormcheckWidget(make_napari_viewer())
    assert widget.run() is None
    assert [n.message for n in notifications] == ["add an image layer and choose it in the widget"]
