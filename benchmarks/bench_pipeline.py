"""Machinery throughput: the whole check with a model that costs nothing, so our own code is timed.

Run: ``python benchmarks/bench_pipeline.py [--shape 64,1024,1024] [--tiles 32,256,256 ...]
[--device cpu|cuda] [--memory] [--cache-mb N] [--cores 1 2]``. Prints measured figures; asserts nothing.

The model is a per-channel scale and shift (a 1x1x1 convolution of one channel) and a BatchNorm
with 2 output channels (running statistics
that fit no tile, so the disparity is not zero): its forwards take a few percent of the run, and what is
left is reading, intensity normalization, stitching, metrics, seams, tile grids and writes. Each case
runs in a fresh process (peak RSS is per process) on a uint8 zarr volume with a membrane-like texture.

Printed per case: input Mvoxel/s (target >= 10 on 2 CPU cores), seconds per named stage of the
report's timing and their sum against the wall time (target: within 5%), peak RSS, and the bytes OUT
holds per input voxel per output channel (uncompressed array size, and on disk).
``--memory`` runs the default tile on 1x, 16x and 64x the voxels (growing in y and x) and prints the
peak RSS ratios (target: within 1.25x), each case also run with glibc giving freed large arrays back
at once (``MALLOC_MMAP_THRESHOLD_``): the memory the run had in use, apart from what glibc keeps. ``--blend`` times the blend alone (the chunk sums on the
run's device, from random predictions already there) for each tile and ``--threads`` value.
``--cores 1 2`` runs each case with the whole process on one CPU, then on two (Linux; torch's
threads as many): what the second core gives the run, its reader, writer and metrics threads
included (``--threads`` alone changes torch's intra-op threads only).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_normcheck.core.run.timing import MAIN_THREAD_STAGES


def make_model(spatial_dims: int = 3):
    """A per-channel scale and shift (a 1x1 convolution of one input channel, written out) and a
    BatchNorm with running statistics that fit no tile.

    The scale is written out because torch's oneDNN path takes 17 ms for a 1x1 ``Conv2d`` of one
    channel on a 512x512 plane (0.35 ms without oneDNN): the 2D case then timed torch, not us.
    """
    import torch
    from torch import nn

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(2))
            self.bias = nn.Parameter(torch.randn(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            return x * self.weight.view(shape) + self.bias.view(shape)

    torch.manual_seed(0)
    norm = nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d
    model = nn.Sequential(Scale(), norm(2))
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)
        model[1].running_var.fill_(0.05)
    return model.eval()


def make_zarr(path: Path, shape: tuple[int, int, int]) -> None:
    """A uint8 zarr volume: smooth blobs and noise, written plane block by plane block."""
    import zarr

    rng = np.random.default_rng(0)
    array = zarr.create_array(str(path), shape=shape, chunks=(16, 256, 256), dtype="uint8")
    yy, xx = np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
    for z in range(0, shape[0], 16):
        depth = min(16, shape[0] - z)
        block = np.empty((depth, *shape[1:]), dtype=np.uint8)
        for k in range(depth):
            wave = np.sin(yy / (17.0 + z + k)) * np.cos(xx / 23.0)
            noise = rng.integers(0, 60, size=shape[1:], dtype=np.uint8)
            block[k] = (np.clip(wave * 90 + 120, 0, 195)).astype(np.uint8) + noise
        array[z : z + depth] = block


def run_case(
    volume_path: str,
    out: str,
    tile: tuple[int, int, int],
    device: str,
    threads: int = 0,
    cache_mb: int | None = None,
) -> dict:
    """One run of the check in this process; its figures."""
    import torch

    from napari_normcheck.core.base.config import RunConfig
    from napari_normcheck.core.io.volume import open_volume
    from napari_normcheck.core.run.engine import run_check
    from napari_normcheck.core.run.events import RunFinished

    spatial_dims = 2 if tile[0] == 1 else 3
    model = make_model(spatial_dims)
    config = RunConfig(
        tile=tile,
        overlap=0.25,
        blend="gaussian",
        normalize="minmax:0,255",
        activation="sigmoid",
        device=device,
        spatial_dims=spatial_dims,
        threads=threads,
        **({} if cache_mb is None else {"cache_mb": cache_mb}),
    )
    volume = open_volume(volume_path)
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    summary: dict = {}
    for event in run_check(volume, model, config, out, divisor=1, spatial_dims=spatial_dims):
        if isinstance(event, RunFinished):
            summary = event.summary
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    n_voxels = int(np.prod(volume.spatial_shape))
    on_disk = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    return {
        "tile": list(tile),
        "threads": threads,
        "wall_s": wall,
        "mvoxel_per_s": n_voxels / wall / 1e6,
        "cpu_s": cpu,
        "load": os.getloadavg()[0],
        "timing": summary.get("timing", {}),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "out_bytes_per_voxel": summary.get("out_bytes_per_voxel"),
        "disk_bytes_per_voxel_channel": on_disk / n_voxels / 2,
        "disparity": summary.get("disparity", {}).get("hard"),
    }


#: glibc then hands every freed array of 1 MiB or more back to the system at once, so the peak RSS
#: is the memory the run had in use, not what glibc kept of freed arrays (slower: page faults).
IN_USE_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


def in_subprocess(
    volume: Path,
    tile: tuple[int, int, int],
    device: str,
    threads: int = 0,
    env: dict[str, str] | None = None,
    cache_mb: int | None = None,
    cores: int | None = None,
) -> dict:
    """Run one case in a fresh interpreter (its own peak RSS), with ``env`` added to its environment.

    With ``cores``, the interpreter runs on the first ``cores`` CPUs only (Linux), all its threads.
    """
    with tempfile.TemporaryDirectory() as tmp:
        here, out = str(Path(__file__).parent), f"{tmp}/out.zarr"
        case = f"{str(volume)!r}, {out!r}, {tuple(tile)!r}, {device!r}, {threads}, {cache_mb}"
        pin = "" if cores is None else f"import os; os.sched_setaffinity(0, range({cores})); "
        code = (
            f"{pin}import json, sys; sys.path.insert(0, {here!r}); import bench_pipeline as b; "
            f"print(json.dumps(b.run_case({case})))"
        )
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, **(env or {})},
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        return json.loads(done.stdout.strip().splitlines()[-1])


def time_blend(shape: tuple[int, ...], tile: tuple[int, ...], device: str, threads: int) -> dict:
    """The blend alone: every tile's two predictions added into the chunk sums, on ``device``."""
    import torch

    from napari_normcheck.core.base.tiling import plan_tiles
    from napari_normcheck.core.run.stitch import ChunkAccumulator, importance_map

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        plan = plan_tiles(shape, tile, overlap=0.25)
        weights = importance_map(plan.window_shape, "gaussian", 2 if tile[0] == 1 else 3)
        generator = torch.Generator(device=device).manual_seed(0)
        predictions = [
            torch.rand((2, *plan.window_shape), generator=generator, device=device)
            for _ in range(2)
        ]
        with tempfile.TemporaryDirectory() as scratch:
            accumulator = ChunkAccumulator(
                plan, 4, weights, lambda *_: None, scratch, max_bytes=2**40, device=device
            )
            t0 = time.perf_counter()
            for each in plan.tiles():
                accumulator.add(each, predictions)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    return {
        "seconds": seconds,
        "tiles": plan.n_tiles,
        "mvoxel_per_s": np.prod(shape) / seconds / 1e6,
    }


def threads_text(threads: int) -> str:
    """``, --threads N`` where set (0: torch's own choice, from ``OMP_NUM_THREADS``)."""
    return f", --threads {threads}" if threads else ""


def print_case(shape: tuple[int, ...], result: dict) -> None:
    """Throughput, stages against the wall time, memory and output size of one case."""
    timing = result["timing"]
    staged = sum(timing.get(k, 0.0) for k in MAIN_THREAD_STAGES)
    total = timing.get("total", result["wall_s"])
    print(
        f"\nvolume {'x'.join(map(str, shape))}, tile {'x'.join(map(str, result['tile']))}"
        f"{threads_text(result.get('threads', 0))}: "
        f"{result['wall_s']:.1f} s, {result['mvoxel_per_s']:.2f} Mvoxel/s of input; "
        f"CPU {result['cpu_s']:.1f} s (all threads; {result['cpu_s'] / result['wall_s']:.2f} cores "
        f"busy), load average {result['load']:.1f}"
    )
    print(
        "  stages: "
        + ", ".join(f"{k} {timing[k]:.2f}" for k in MAIN_THREAD_STAGES if k in timing)
        + f"; read (reader thread, overlapped) {timing.get('read', 0):.2f}"
    )
    print(
        f"  stages sum {staged:.2f} s vs run total {total:.2f} s "
        f"({100 * staged / max(total, 1e-9):.1f}%); process wall {result['wall_s']:.2f} s"
    )
    print(
        f"  peak RSS {result['peak_rss_mib']:.0f} MiB; OUT {result['out_bytes_per_voxel']} bytes "
        f"per input voxel (uncompressed, all outputs), "
        f"{result['disk_bytes_per_voxel_channel']:.2f} on disk per voxel per channel"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64,1024,1024")
    parser.add_argument("--tiles", nargs="+", default=["32,256,256", "64,128,128", "1,512,512"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--cache-mb",
        type=int,
        default=None,
        help="the run's --cache-mb (memory for unfinished chunks, half again for slabs)",
    )
    parser.add_argument(
        "--threads",
        nargs="+",
        type=int,
        default=[0],
        help="torch intra-op threads of the run, one case per value (0: torch's choice)",
    )
    parser.add_argument(
        "--cores",
        nargs="+",
        type=int,
        default=None,
        help="run each case on the first N CPUs only, one case per value (Linux; torch threads N)",
    )
    parser.add_argument(
        "--blend",
        action="store_true",
        help="time the blend alone (chunk sums on --device) per tile and --threads value",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="peak RSS at 1x, 16x, 64x voxels (the first --tiles; 1x is one tile wide)",
    )
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    if args.blend:
        for text in args.tiles:
            tile = tuple(int(v) for v in text.split(","))
            for threads in args.threads:
                result = time_blend(shape, tile, args.device, threads)
                print(
                    f"blend alone, volume {'x'.join(map(str, shape))}, tile {text}"
                    f"{threads_text(threads)}: {result['seconds']:.2f} s for {result['tiles']} "
                    f"tiles x 2 modes, {result['mvoxel_per_s']:.1f} Mvoxel/s of input"
                )
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.memory:
            # The first tile; the 1x volume is one tile wide in y and x (the defaults: 32x256x256
            # tiles over 64x256x256, 64x1024x1024 and 64x2048x2048).
            tile = tuple(int(v) for v in args.tiles[0].split(","))
            peaks, in_use = [], []
            for factor in (1, 4, 8):
                grown = (shape[0], tile[1] * factor, tile[2] * factor)
                path = Path(tmp) / f"vol_{factor}.zarr"
                make_zarr(path, grown)
                result = in_subprocess(
                    path, tile, args.device, args.threads[0], cache_mb=args.cache_mb
                )
                print_case(grown, result)
                peaks.append(result["peak_rss_mib"])
                used = in_subprocess(
                    path, tile, args.device, args.threads[0], IN_USE_ENV, args.cache_mb
                )
                in_use.append(used["peak_rss_mib"])
                print(
                    f"  in use (with {' '.join(f'{k}={v}' for k, v in IN_USE_ENV.items())}): "
                    f"peak RSS {in_use[-1]:.0f} MiB, {used['mvoxel_per_s']:.2f} Mvoxel/s"
                )
            print(
                f"\npeak RSS 16x/1x {peaks[1] / peaks[0]:.2f}, 64x/1x {peaks[2] / peaks[0]:.2f} "
                f"(target <= 1.25); in use {in_use[1] / in_use[0]:.2f} and "
                f"{in_use[2] / in_use[0]:.2f}"
            )
            return 0
        path = Path(tmp) / "vol.zarr"
        t0 = time.perf_counter()
        make_zarr(path, shape)
        print(f"made {path.name} {shape} uint8 in {time.perf_counter() - t0:.1f} s")
        for text in args.tiles:
            tile = tuple(int(v) for v in text.split(","))
            for threads in args.threads:
                for cores in args.cores or [None]:
                    result = in_subprocess(
                        path, tile, args.device, threads or cores or 0, None, args.cache_mb, cores
                    )
                    if cores is not None:
                        print(f"on {cores} core(s):")
                    print_case(shape, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
