"""The whole check against the model alone: a BatchNorm BasicUNet on real EM.

Run: ``python benchmarks/bench_model.py [--shape 16,512,512] [--tile 16,96,96] [--device cpu]``.
Prints measured figures; asserts nothing.

- process: ``napari-normcheck run`` as a user runs it (start to exit, imports included), on a zarr
  crop of ISBI 2012 (``../shared/data/em``; a synthetic volume when that is not there).
- bare: the same tiles, already read and normalized in memory, through the same forwards (eval and
  train, batch 1), nothing else. Target: process / bare <= 1.10.
- monai: two calls of MONAI's ``sliding_window_inference`` (eval, and a copy with batch statistics)
  on the volume in RAM, which compute no metrics and write nothing. Target: process / monai <= 1.0.
- features: the eval forwards with the per-tile feature statistics hooks against without.
  Target: < 3% of a forward.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ISBI = Path(__file__).resolve().parents[2] / "shared" / "data" / "em" / "isbi2012_train_raw.tif"
ARCH = "monai.networks.nets.BasicUNet"
ARCH_KWARGS = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "features": [8, 16, 32, 64, 128, 8],
    "norm": "batch",
    "dropout": 0.0,
}


def make_model(tile: tuple[int, int, int]):
    """The BasicUNet with running statistics from a few training batches of noise."""
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    model = BasicUNet(**ARCH_KWARGS)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 1, *tile) * 0.5 + 0.2)
    return model.eval()


def make_volume(path: Path, shape: tuple[int, int, int]) -> str:
    """A uint8 zarr crop of ISBI 2012 (or noise); returns where the data came from."""
    import zarr

    if ISBI.is_file():
        import tifffile

        data = tifffile.imread(ISBI)
        reps = [-(-s // d) for s, d in zip(shape, data.shape)]
        data = np.tile(data, reps)[: shape[0], : shape[1], : shape[2]]
        source = f"ISBI 2012 ({ISBI.name})"
    else:
        data = np.random.default_rng(0).integers(0, 255, size=shape, dtype=np.uint8)
        source = "noise (ISBI 2012 not found)"
    array = zarr.create_array(str(path), shape=shape, chunks=(16, 256, 256), dtype="uint8")
    array[...] = data
    return source


def bare_seconds(volume_path: Path, model, tile, device) -> tuple[float, float, int]:
    """Seconds of the eval and train forwards over the run's tiles; with feature hooks; tiles."""
    from napari_normcheck.core.base.tiling import plan_tiles
    from napari_normcheck.core.io.intensity import resolve_intensity
    from napari_normcheck.core.io.volume import open_volume
    from napari_normcheck.core.measure.features import FeatureRecorder, default_feature_layers
    from napari_normcheck.core.run.forward import forward_batch
    from napari_normcheck.core.run.tile_io import read_window

    volume = open_volume(str(volume_path))
    plan = plan_tiles(volume.spatial_shape, tile, overlap=0.25, blend="gaussian")
    transform = resolve_intensity("percentile:1,99.8", volume.data)
    windows = [read_window(volume, plan, t, transform) for t in plan.tiles()]
    forward_batch(model, windows[:1], "eval", 3, device)  # warm-up
    t0 = time.perf_counter()
    for mode in ("eval", "train"):
        for window in windows:
            forward_batch(model, [window], mode, 3, device)
    bare = time.perf_counter() - t0
    recorder = FeatureRecorder(model, default_feature_layers(model))
    t0 = time.perf_counter()
    with recorder.recording():
        for window in windows:
            forward_batch(model, [window], "eval", 3, device)
            recorder.take()
    hooked_eval = time.perf_counter() - t0
    t0 = time.perf_counter()
    for window in windows:
        forward_batch(model, [window], "eval", 3, device)
    plain_eval = time.perf_counter() - t0
    return bare, (hooked_eval - plain_eval) / plain_eval, plan.n_tiles


def monai_seconds(volume_path: Path, model, tile, device) -> float:
    """Two sliding_window_inference calls (eval, batch statistics) on the volume in RAM."""
    import zarr
    from monai.inferers import sliding_window_inference

    from napari_normcheck.core.base.modes import normalization_mode
    from napari_normcheck.core.io.intensity import resolve_intensity

    data = zarr.open_array(str(volume_path), mode="r")[:]
    transform = resolve_intensity("percentile:1,99.8", data[None])
    image = torch.from_numpy(transform.apply(data[None]))[None].to(device)
    train_copy = copy.deepcopy(model)
    t0 = time.perf_counter()
    with torch.inference_mode():
        sliding_window_inference(image, tile, 1, model, overlap=0.25, mode="gaussian")
        with normalization_mode(train_copy, "train"):
            sliding_window_inference(image, tile, 1, train_copy, overlap=0.25, mode="gaussian")
    return time.perf_counter() - t0


def process_seconds(volume_path: Path, model_path: Path, out: Path, tile, device) -> dict:
    """``napari-normcheck run`` start to exit; its report."""
    report = out.with_suffix(".json")
    command = [
        sys.executable,
        "-m",
        "napari_normcheck.cli",
        "run",
        str(volume_path),
        "--model",
        str(model_path),
        "--arch",
        ARCH,
        "--arch-kwargs",
        json.dumps(ARCH_KWARGS),
        "--out",
        str(out),
        "--tile",
        ",".join(map(str, tile)),
        "--normalize",
        "percentile:1,99.8",
        "--activation",
        "sigmoid",
        "--device",
        device,
        "--report",
        str(report),
    ]
    t0 = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "report": json.loads(report.read_text())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="16,512,512")
    parser.add_argument("--tile", default="16,96,96")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    tile = tuple(int(v) for v in args.tile.split(","))
    device = torch.device(args.device)
    model = make_model(tile).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        volume_path = Path(tmp) / "em.zarr"
        source = make_volume(volume_path, shape)
        model_path = Path(tmp) / "unet.pt"
        torch.save(model.state_dict(), model_path)
        print(f"volume {shape} from {source}, tile {tile}, {args.device}")
        run = process_seconds(volume_path, model_path, Path(tmp) / "out.zarr", tile, args.device)
        bare, feature_share, n_tiles = bare_seconds(volume_path, model, tile, device)
        monai = monai_seconds(volume_path, model, tile, device)
    timing = run["report"].get("timing", {})
    print(f"tiles: {n_tiles}; disparity {run['report'].get('disparity', {}).get('hard')}")
    print(
        f"process (start to exit): {run['seconds']:.1f} s; run total {timing.get('total', 0):.1f} s"
    )
    print("  stages: " + ", ".join(f"{k} {v:.2f}" for k, v in timing.items()))
    print(
        f"bare forwards (eval + train): {bare:.1f} s -> process / bare {run['seconds'] / bare:.3f}"
    )
    print(f"MONAI sliding window x2: {monai:.1f} s -> process / monai {run['seconds'] / monai:.3f}")
    print(f"feature statistics: {100 * feature_share:.1f}% of an eval forward")
    return 0


if __name__ == "__main__":
    sys.exit(main())
