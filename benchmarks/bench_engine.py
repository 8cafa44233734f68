"""Engine benchmarks: peak memory vs volume size, and time vs bare forwards and MONAI.

Run: ``python benchmarks/bench_engine.py [--quick] [--only memory|speed] [--base Z,Y,X] [--tile Z,Y,X]``.
Prints measured figures and ratios; asserts nothing.

- memory: the engine on zarr volumes of 1x, 4x and 16x a base size, each in a fresh process; peak RSS.
  Target: the 16x run's peak within 1.25x of the 1x run's.
- speed: a two-mode run end to end / the bare model forwards over the same tiles and batch sizes
  (target <= 1.15 on CPU), and / two calls of MONAI's sliding_window_inference (eval + train) on the
  in-memory volume (target <= 1.05).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TILE = (32, 64, 64)


def make_model():
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    model = BasicUNet(3, 1, 2, features=(8, 16, 32, 64, 128, 8), norm="batch", dropout=0.0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(1, 1, *TILE) * 2 + 1)
    return model.eval()


def make_zarr(path: Path, shape: tuple[int, int, int]) -> None:
    import zarr

    rng = np.random.default_rng(0)
    array = zarr.create_array(str(path), shape=shape, chunks=(16, 128, 128), dtype="uint8")
    for z in range(0, shape[0], 16):
        array[z : z + 16] = rng.integers(
            0, 255, size=(min(16, shape[0] - z), *shape[1:]), dtype=np.uint8
        )


def engine_run(volume_path: str, out: str, cache_mb: int) -> dict:
    from napari_normcheck.core.base.config import RunConfig
    from napari_normcheck.core.io.volume import open_volume
    from napari_normcheck.core.run.engine import run_check
    from napari_normcheck.core.run.events import RunFinished

    model = make_model()
    config = RunConfig(
        tile=TILE, overlap=0.25, blend="gaussian", normalize="minmax:0,255", cache_mb=cache_mb
    )
    t0 = time.perf_counter()
    summary = None
    for event in run_check(open_volume(volume_path), model, config, out, divisor=16):
        if isinstance(event, RunFinished):
            summary = event.summary
    return {
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "summary": summary,
    }


def memory_benchmark(base: tuple[int, int, int], cache_mb: int) -> None:
    factors = {"1x": (1, 1, 1), "4x": (1, 2, 2), "16x": (4, 2, 2)}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (fz, fy, fx) in factors.items():
            shape = (base[0] * fz, base[1] * fy, base[2] * fx)
            volume = Path(tmp) / f"{name}.zarr"
            make_zarr(volume, shape)
            code = (
                f"import json,sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_engine as b; "
                f"b.TILE = {TILE!r}; "
                f"print(json.dumps(b.engine_run({str(volume)!r}, {str(Path(tmp) / (name + '_out.zarr'))!r}, {cache_mb})))"
            )
            output = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            )
            results[name] = json.loads(output.stdout.strip().splitlines()[-1])
            print(
                f"memory {name:>3} volume {shape}: peak RSS {results[name]['peak_rss_mb']:.0f} MB, "
                f"{results[name]['seconds']:.1f} s, spilled chunks {results[name]['summary']['spilled_chunks']}"
            )
    ratio = results["16x"]["peak_rss_mb"] / results["1x"]["peak_rss_mb"]
    print(f"memory ratio 16x/1x peak RSS: {ratio:.3f} (target <= 1.25)")


def speed_benchmark(shape: tuple[int, int, int]) -> None:
    from monai.inferers import sliding_window_inference

    from napari_normcheck.core.base.modes import has_running_stats
    from napari_normcheck.core.base.tiling import plan_tiles
    from napari_normcheck.core.io.intensity import resolve_intensity
    from napari_normcheck.core.io.volume import open_volume

    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        volume_path = Path(tmp) / "v.zarr"
        make_zarr(volume_path, shape)
        engine_run(
            str(volume_path), str(Path(tmp) / "warm.zarr"), 512
        )  # warm-up (allocator, oneDNN)
        run = engine_run(str(volume_path), str(Path(tmp) / "o.zarr"), 512)

        model = make_model()
        plan = plan_tiles(shape, TILE, overlap=0.25, blend="gaussian")
        x = torch.randn(1, 1, *TILE)
        train_model = copy.deepcopy(model)
        for m in train_model.modules():
            if has_running_stats(m):
                m.train()
                m.momentum = 0.0
        t0 = time.perf_counter()
        with torch.inference_mode():
            for _ in range(plan.n_tiles):
                model(x)
                train_model(x)
        bare = time.perf_counter() - t0

        volume = open_volume(str(volume_path))
        image = torch.from_numpy(
            resolve_intensity("minmax:0,255", volume.data).apply(volume.data.compute())
        )[None]
        t0 = time.perf_counter()
        with torch.inference_mode():
            sliding_window_inference(image, TILE, 1, model, 0.25, "gaussian")
            sliding_window_inference(image, TILE, 1, train_model, 0.25, "gaussian")
        monai = time.perf_counter() - t0
    print(f"speed volume {shape}, tile {TILE}, {plan.n_tiles} tiles, two modes:")
    print(f"  engine end to end {run['seconds']:.2f} s (timing {run['summary']['timing']})")
    print(
        f"  bare forwards     {bare:.2f} s -> overhead ratio {run['seconds'] / bare:.3f} (target <= 1.15)"
    )
    print(
        f"  MONAI x2          {monai:.2f} s -> MONAI ratio    {run['seconds'] / monai:.3f} (target <= 1.05)"
    )


def main(argv: list[str] | None = None) -> None:
    global TILE  # --tile: read by every function here
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller volumes")
    parser.add_argument("--cache-mb", type=int, default=64)
    parser.add_argument("--only", choices=("memory", "speed"))
    parser.add_argument("--base", help="base volume Z,Y,X (default 64,192,192; 32,128,128 quick)")
    parser.add_argument("--tile", help=f"tile Z,Y,X, multiples of 16 (default {TILE})")
    args = parser.parse_args(argv)
    if args.tile:
        TILE = tuple(int(v) for v in args.tile.split(","))
    base = (32, 128, 128) if args.quick else (64, 192, 192)
    if args.base:
        base = tuple(int(v) for v in args.base.split(","))
    if args.only in (None, "memory"):
        memory_benchmark(base, args.cache_mb)
    if args.only in (None, "speed"):
        speed_benchmark(base)


if __name__ == "__main__":
    main()
