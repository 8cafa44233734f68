"""Screenshots of the dock widget after a real check: an EM crop, the packaged BatchNorm model.

Regenerates ``docs/screenshot.png`` (the nearly-empty-second-channel case, Results tab)::

    QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1600x1000x24" \\
        python scripts/widget_screenshots.py --image isbi2012_train_raw.tif --faint \\
        --faint-voxels 5 --channel 0 --out docs/screenshot.png

``--image`` is the ISBI 2012 ssTEM training stack (30x512x512 uint8, public); a crop
``--crop 16,256,256`` from its first plane and corner is checked. Without ``--image`` the packaged
synthetic sample is used. ``--faint`` lowers the final bias of output channel 1 until about
``--faint-voxels`` voxels of the crop exceed probability 0.5 in eval mode (as
``tests/core/test_support.py`` does): a channel with too little foreground for a hard Dice.
``--tabs`` also saves the Check and Remedies tabs beside ``--out`` (``_check``, ``_remedies``).
The window is 1600x1000; the whole window is saved (napari's ``screenshot(canvas_only=False)``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

WINDOW_SIZE = (1600, 1000)
SETTLE_MS = 800


def crop_of(path: str | None, crop: tuple[int, int, int]) -> tuple[np.ndarray, str]:
    """The image checked and its layer name: a corner crop of ``path`` or the packaged sample."""
    if path is None:
        from napari_normcheck.data import sample_volume

        return sample_volume(crop), "sample"
    import tifffile

    stack = tifffile.imread(path)
    return np.ascontiguousarray(stack[: crop[0], : crop[1], : crop[2]]), Path(path).stem


def faint_model(image: np.ndarray, n_above: int) -> object:
    """The packaged BatchNorm model with channel 1's bias lowered: ~``n_above`` voxels above 0.5."""
    import torch

    from napari_normcheck.data import sample_model

    model = sample_model("batchnorm").load()
    x = torch.from_numpy(image.astype(np.float32) / 255)[None, None]
    with torch.no_grad():
        logits = model(x)[0, 1].numpy().ravel()
        cut = float(np.sort(logits)[-n_above])
        model.final_conv.bias[1] -= cut + 1e-3
    return model


def main(argv: list[str] | None = None) -> int:
    """Run the check in a shown viewer and save the screenshots; the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--image", help="a 3D tif (ISBI 2012 ssTEM); the packaged sample if left out"
    )
    parser.add_argument("--crop", default="16,256,256", help="z,y,x size of the corner crop")
    parser.add_argument("--tile", default="16,64,64")
    parser.add_argument("--faint", action="store_true", help="make output channel 1 nearly empty")
    parser.add_argument("--faint-voxels", type=int, default=40)
    parser.add_argument("--out", default="docs/screenshot.png")
    parser.add_argument("--tabs", action="store_true", help="also the Check and Remedies tabs")
    parser.add_argument(
        "--channel", type=int, default=None, help="show this output channel (the widget's choice)"
    )
    args = parser.parse_args(argv)

    import napari
    import torch
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_normcheck._qt.demo_gui import DOCK_NAME, screenshot_view
    from napari_normcheck._qt.widget import NormcheckWidget
    from napari_normcheck.data import sample_model

    crop = tuple(int(v) for v in args.crop.split(","))
    image, name = crop_of(args.image, crop)  # type: ignore[arg-type]
    sample = sample_model("batchnorm")
    work = Path(tempfile.mkdtemp(prefix="normcheck_shots_"))
    model_file = sample.path
    if args.faint:
        model_file = work / "faint_channel_1.pt"
        torch.save(faint_model(image, args.faint_voxels).state_dict(), model_file)

    viewer = napari.Viewer(title="napari-normcheck")
    viewer.window.resize(*WINDOW_SIZE)
    viewer.add_image(image, name=name)
    widget = NormcheckWidget(viewer)
    viewer.window.add_dock_widget(widget, name=DOCK_NAME, area="right")
    widget.image_combo.setCurrentText(name)
    widget.model_path.setText(str(model_file))
    widget.arch.setText(sample.arch)
    widget.arch_kwargs.setText(json.dumps(sample.arch_kwargs))
    widget.settings.set_model_normalize(sample.normalize)  # what the sample models expect
    widget.activation.setCurrentText(sample.activation)
    widget.tile.setText(args.tile)
    widget.device.setCurrentText("cpu")
    widget.out_path.setText(str(work / "out.zarr"))
    widget.overwrite.setChecked(True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    status = {"code": 0}

    def save(path: Path) -> None:
        viewer.screenshot(str(path), canvas_only=False)
        print(f"screenshot: {path}")

    def finish() -> None:
        save(out)
        print(widget.summary_label.text())
        if args.tabs:
            widget.tabs.setCurrentWidget(widget.check_tab)
            QTimer.singleShot(SETTLE_MS, lambda: (save(_beside(out, "check")), remedies()))
        else:
            quit_all()

    def remedies() -> None:
        widget.tabs.setCurrentWidget(widget.remedies_tab)
        QTimer.singleShot(SETTLE_MS, lambda: (save(_beside(out, "remedies")), quit_all()))

    def quit_all() -> None:
        viewer.close()
        QApplication.quit()

    def settled() -> None:
        widget.run_settled.disconnect(settled)
        if widget.finished_event is None:
            print(f"the run did not finish: {widget.status_label.text()}")
            status["code"] = 1
            quit_all()
            return
        if args.channel is not None:
            widget.channel_combo.setCurrentIndex(args.channel)
        QTimer.singleShot(SETTLE_MS, arrange)

    def arrange() -> None:
        screenshot_view(viewer, widget)
        QTimer.singleShot(SETTLE_MS, finish)

    widget.run_settled.connect(settled)
    if widget.run() is None:
        print(f"the run did not start: {widget.status_label.text()}")
        return 1
    napari.run()
    return status["code"]


def _beside(path: Path, suffix: str) -> Path:
    return path.with_name(f"{path.stem}_{suffix}{path.suffix}")


if __name__ == "__main__":
    raise SystemExit(main())
