"""Throughput of the two-mode check in voxels/s, and its ratio to bare forwards over the same tiles.

Run: ``python benchmarks/bench_throughput.py [--quick] [--device cpu|cuda|all]``. Prints measured
figures; asserts nothing. On the CPU: fp32. On CUDA (when available) also: the fused train pass
against one tile per train forward, and tf32 / bf16 / fp16 with the disparity each causes against
fp32 (from the run's report).

- engine: ``run_check`` end to end on a zarr volume (read, normalize, two passes, stitch, write).
- bare: the same windows, already in memory on the host, through the same forwards (same batches,
  same precision), nothing else; the ratio engine / bare is the cost of everything around the model.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import TILE, make_model, make_zarr  # noqa: E402


def engine_seconds(volume_path: str, out: str, model, config) -> tuple[float, dict]:
    from napari_normcheck.core.io.volume import open_volume
    from napari_normcheck.core.run.engine import run_check
    from napari_normcheck.core.run.events import RunFinished

    t0 = time.perf_counter()
    summary: dict = {}
    for event in run_check(open_volume(volume_path), model, config, out, divisor=16):
        if isinstance(event, RunFinished):
            summary = event.summary
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, summary


def bare_seconds(volume_path: str, model, config, device: torch.device, eval_batch: int) -> float:
    from napari_normcheck.core.base.tiling import plan_tiles
    from napari_normcheck.core.io.intensity import resolve_intensity
    from napari_normcheck.core.io.volume import open_volume
    from napari_normcheck.core.models.per_sample_norm import supports_per_sample
    from napari_normcheck.core.run.forward import forward_batch
    from napari_normcheck.core.run.staging import HostStaging
    from napari_normcheck.core.run.tile_io import read_window

    volume = open_volume(volume_path)
    plan = plan_tiles(volume.spatial_shape, config.tile, overlap=config.overlap, blend=config.blend)
    transform = resolve_intensity(config.normalize, volume.data)
    windows = [read_window(volume, plan, tile, transform) for tile in plan.tiles()]
    staging = HostStaging(device)
    fused = (
        config.fuse_train
        and device.type == "cuda"
        and config.train_batch == 1
        and supports_per_sample(model)
    )
    train_batch = eval_batch if fused else config.train_batch
    t0 = time.perf_counter()
    for mode, batch in (("eval", eval_batch), ("train", train_batch)):
        for k in range(0, len(windows), batch):
            forward_batch(
                model,
                windows[k : k + batch],
                mode,
                3,
                device,
                precision=config.precision,
                per_sample=mode == "train" and fused,
                staging=staging,
            )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(device_name: str, shape: tuple[int, int, int], variants: list[dict]) -> None:
    from napari_normcheck.core.base.config import RunConfig

    device = torch.device(device_name)
    base = RunConfig(tile=TILE, overlap=0.25, normalize="minmax:0,255", device=device_name)
    voxels = int(np.prod(shape))
    with tempfile.TemporaryDirectory() as tmp:
        volume_path = str(Path(tmp) / "v.zarr")
        make_zarr(Path(volume_path), shape)
        model = make_model()
        engine_seconds(volume_path, str(Path(tmp) / "warm.zarr"), model, base)  # warm-up
        print(f"{device_name}: volume {shape} ({voxels / 1e6:.1f} Mvoxel), tile {TILE}")
        for k, changes in enumerate(variants):
            config = base.replace(**changes)
            seconds, summary = engine_seconds(
                volume_path, str(Path(tmp) / f"o{k}.zarr"), model, config
            )
            on_device = model if device.type == "cpu" else copy.deepcopy(model).to(device)
            bare = bare_seconds(volume_path, on_device, config, device, summary["eval_batch"])
            label = ", ".join(f"{k}={v}" for k, v in changes.items()) or "defaults"
            print(
                f"  {label:<32} {voxels / seconds / 1e6:7.2f} Mvoxel/s, engine {seconds:6.2f} s, "
                f"bare forwards {bare:6.2f} s, ratio {seconds / bare:.3f}, "
                f"eval batch {summary['eval_batch']}, model waited for the reader "
                f"{summary['timing'].get('read_wait', 0.0):.2f} s"
            )
            effect = summary.get("precision_effect")
            if effect:
                print(f"    {config.precision} vs fp32 on sample tiles (1 - Dice): {effect}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smaller volume")
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument("--shape", help="volume Z,Y,X (default 64,192,192; 32,128,128 quick)")
    args = parser.parse_args(argv)
    shape = (32, 128, 128) if args.quick else (64, 192, 192)
    if args.shape:
        shape = tuple(int(v) for v in args.shape.split(","))
    if args.device in ("cpu", "all"):
        measure("cpu", shape, [{}])
    if args.device in ("cuda", "all"):
        if not torch.cuda.is_available():
            print("cuda: not available on this machine")
            return
        cuda_shape = tuple(2 * s for s in shape)
        measure(
            "cuda",
            cuda_shape,  # type: ignore[arg-type]
            [
                {},
                {"fuse_train": False},
                {"precision": "tf32"},
                {"precision": "bf16"},
                {"precision": "fp16"},
            ],
        )


if __name__ == "__main__":
    main()
