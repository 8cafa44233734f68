"""Measure the remedies: the packaged BatchNorm sample, and a small U-Net trained here on ISBI 2012.

    python benchmarks/bench_remedies.py [--isbi] [--out DIR] [--shape Z,Y,X]

Prints, per row (eval, train, recalibrated eval, batch-stats eval), the hard disparity vs train mode,
the tile mismatch and the Dice vs ground truth per channel, the held-out effect of recalibration and
the BatchNorm folding speed-up. Nothing is asserted: a remedy does not always help.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_normcheck.cli.remedies import format_remedies
from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.io.volume import open_volume
from napari_normcheck.core.remedies.fold import fold_batchnorm, fold_speedup
from napari_normcheck.core.remedies.remedy_run import RemediesFinished, run_remedies
from napari_normcheck.core.run.engine import run_check
from napari_normcheck.core.run.events import RunFinished
from napari_normcheck.data import SAMPLE_MODELS, make_synthetic_em

ISBI = Path(__file__).resolve().parents[2] / "shared" / "data" / "em"


def check_and_remedies(raw, labels, label_map, model, config, out, recalibration):
    """Run the check, then the remedies with labels; print and return the remedies dictionary."""
    volume = open_volume(raw)
    t0 = time.perf_counter()
    events = list(run_check(volume, model, config, out, spatial_dims=config.spatial_dims))
    assert isinstance(events[-1], RunFinished)
    t_check = time.perf_counter() - t0
    t0 = time.perf_counter()
    remedies = None
    for event in run_remedies(
        out, volume, model, labels=labels, label_map=label_map, recalibration=recalibration
    ):
        if isinstance(event, RemediesFinished):
            remedies = event.remedies
    print(f"check {t_check:.1f} s, remedies {time.perf_counter() - t0:.1f} s")
    print(format_remedies(remedies))
    return remedies


def sample(out_dir: Path, shape: tuple[int, int, int] = (48, 192, 192)) -> None:
    """The packaged BatchNorm sample on the packaged synthetic volume and its labels."""
    print(f"== packaged BatchNorm sample on the synthetic EM sample {shape}")
    raw, truth = make_synthetic_em(shape, seed=0)
    labels = (truth[0] + 2 * truth[1] * (truth[0] == 0)).astype(np.uint8)
    spec = SAMPLE_MODELS["batchnorm"]
    model = spec.load()
    config = RunConfig(
        tile=spec.tile,
        normalize=spec.normalize,
        activation=spec.activation,
        device="cpu",
        spatial_dims=3,
    )
    for variance in ("mean", "pooled"):
        print(f"-- recalibration variance: {variance}")
        check_and_remedies(
            raw,
            labels,
            {0: (1,), 1: (2,)},
            model,
            config,
            out_dir / f"sample_{variance}.zarr",
            {"n_tiles": 32, "holdout": 8, "variance": variance},
        )
    folded = fold_batchnorm(model)
    # Nine 48x64x64 tiles (fewer, and smaller, on a smaller volume).
    corners = [range(0, max(side - 64, 0) + 1, 64)[:3] for side in shape[1:]]
    tiles = [
        torch.from_numpy(raw[None, None, :48, y : y + 64, x : x + 64].astype(np.float32) / 255)
        for y in corners[0]
        for x in corners[1]
    ]
    timing = fold_speedup(model, folded.model, tiles, repeats=5)
    print(
        f"fold: {len(folded.folded)} BatchNorm folded; {len(tiles)} tiles {timing['seconds_original']:.3f} s "
        f"-> {timing['seconds_folded']:.3f} s (speed-up {timing['speedup']:.2f}); "
        f"max |logit difference| {timing['max_abs_difference']:.2e}"
    )


def train_isbi_unet(raw: np.ndarray, membrane: np.ndarray, steps: int, seed: int = 0):
    """A tiny 2D BatchNorm U-Net trained with batch size 1 on 128x128 crops (as small-batch EM training)."""
    from monai.networks.nets import BasicUNet

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = BasicUNet(2, 1, 1, features=(8, 8, 16, 16, 32, 8), norm="batch", dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(steps):
        z = rng.integers(raw.shape[0])
        y, x = rng.integers(0, raw.shape[1] - 128, size=2)
        image = torch.from_numpy(raw[z, y : y + 128, x : x + 128].astype(np.float32) / 255)
        target = torch.from_numpy(membrane[z, y : y + 128, x : x + 128].astype(np.float32))
        optimizer.zero_grad()
        loss = loss_fn(model(image[None, None]), target[None, None])
        loss.backward()
        optimizer.step()
    return model.eval()


def isbi(out_dir: Path, steps: int) -> None:
    """Train on ISBI slices 0-19, check and try the remedies on slices 20-29 (with their labels)."""
    import tifffile

    raw = tifffile.imread(ISBI / "isbi2012_train_raw.tif")
    labels = tifffile.imread(ISBI / "isbi2012_train_labels.tif")
    membrane = labels == 0  # ISBI: 0 = membrane, 255 = cell interior
    print(f"== ISBI 2012: 2D BatchNorm U-Net, batch 1, {steps} steps on slices 0-19")
    t0 = time.perf_counter()
    model = train_isbi_unet(raw[:20], membrane[:20], steps)
    print(f"trained in {time.perf_counter() - t0:.0f} s")
    test_raw, test_labels = raw[20:30], labels[20:30]
    config = RunConfig(
        tile=(1, 128, 128),
        normalize="minmax:0,255",
        activation="sigmoid",
        device="cpu",
        spatial_dims=2,
    )
    check_and_remedies(
        test_raw,
        test_labels,
        {0: (0,)},
        model,
        config,
        out_dir / "isbi.zarr",
        {"n_tiles": 64, "holdout": 8},
    )


def main(argv: list[str] | None = None) -> int:
    """Run the measurements; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isbi", action="store_true", help="also train and measure on ISBI 2012")
    parser.add_argument("--steps", type=int, default=600, help="ISBI training steps")
    parser.add_argument("--out", help="folder for the outputs (a temporary one by default)")
    parser.add_argument("--shape", default="48,192,192", help="synthetic sample Z,Y,X")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.out or tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        sample(out_dir, shape)  # type: ignore[arg-type]
        if args.isbi:
            if not ISBI.exists():
                print(f"no ISBI data at {ISBI}", file=sys.stderr)
                return 1
            isbi(out_dir, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
