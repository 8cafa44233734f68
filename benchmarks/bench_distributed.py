"""Distributed runs: 1 vs 2 local worker processes (one thread each) on the same input, and equality.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_distributed.py [--quick] [--shape Z,Y,X]
[--tile Z,Y,X] [--workers 1,2] [--no-share]``. Prints the time of a single-process run (torch limited to one
thread), of a distributed run on 1 and on 2 local workers, each with the default blocks for its
worker count (as ``run --workers N`` makes them), the speed-up 1 -> 2 workers, the forwards each
block ran (a tile on a block border is predicted once, by the first block to get to it, and shared;
``--no-share``: predicted in each block that touches it), the time blocks waited for shared tiles,
and the largest difference of every output against the single-process run. Asserts nothing.

Cluster start-up (worker processes importing torch) is excluded from the run times: the workers are
started (as ``run --workers`` starts them) and warmed first, as a long-lived cluster would be.
Loading the model on the workers (the worker plugin) is included.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import TILE, make_model, make_zarr  # noqa: E402

OUTPUTS = ("pred_eval", "pred_train", "disparity", "seams_eval", "seams_train", "tile_disparity")
ARCH_KWARGS = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "features": [8, 16, 32, 64, 128, 8],
    "norm": "batch",
    "dropout": 0.0,
}


def _warm() -> int:
    import os

    import monai.networks.nets  # noqa: F401 (import cost paid before timing)

    return os.getpid()


def _forward_seconds(summary: dict) -> float:
    """Seconds in eval and train forwards (summed over blocks in a distributed run)."""
    return summary["timing"]["forward_eval"] + summary["timing"]["forward_train"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small volume (32,128,192)")
    parser.add_argument("--shape", help="volume Z,Y,X (default 64,192,192)")
    parser.add_argument("--tile", help=f"tile Z,Y,X (default {','.join(map(str, TILE))})")
    parser.add_argument(
        "--workers", default="1,2", help="worker counts to run, comma separated (default 1,2)"
    )
    parser.add_argument(
        "--no-share",
        action="store_true",
        help="predict border tiles in every block that touches them (as before sharing)",
    )
    args = parser.parse_args(argv)
    worker_counts = [int(v) for v in args.workers.split(",")]
    shape = (32, 128, 192) if args.quick else (64, 192, 192)
    if args.shape:
        shape = tuple(int(v) for v in args.shape.split(","))
    tile = tuple(int(v) for v in args.tile.split(",")) if args.tile else TILE

    from napari_normcheck.core.base.config import RunConfig
    from napari_normcheck.core.io.volume import open_volume
    from napari_normcheck.core.models.models import load_model
    from napari_normcheck.core.run.blocks import default_block_chunks
    from napari_normcheck.core.run.distributed import (
        ModelSpec,
        local_cluster,
        open_client,
        run_check_distributed,
    )
    from napari_normcheck.core.run.engine import run_check
    from napari_normcheck.core.run.events import BlockDone, RunFinished
    from napari_normcheck.core.run.planning import prepare_run

    torch.set_num_threads(1)  # the single-process reference uses one core, as one worker does
    config = RunConfig(tile=tile, overlap=0.25, normalize="minmax:0,255", activation="sigmoid")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_zarr(folder / "v.zarr", shape)
        torch.save(make_model().state_dict(), folder / "m.pt")
        loaded = load_model(
            folder / "m.pt", arch="monai.networks.nets.BasicUNet", arch_kwargs=ARCH_KWARGS
        )
        volume = open_volume(str(folder / "v.zarr"))
        source = {"source": str(folder / "v.zarr")}
        plan = prepare_run(volume, config, divisor=16).plan
        print(
            f"volume {shape}, tile {tile}, {plan.n_tiles} tiles, chunk grid {plan.chunk_grid}, "
            "default blocks of "
            + ", ".join(
                f"{default_block_chunks(plan, n, shared=not args.no_share)} chunks for {n} worker(s)"
                for n in worker_counts
            )
        )

        t0 = time.perf_counter()
        for event in run_check(volume, loaded.module, config, folder / "single.zarr", divisor=16):
            if isinstance(event, RunFinished):
                forwards = _forward_seconds(event.summary) / plan.n_tiles
        single = time.perf_counter() - t0
        print(f"single process, 1 torch thread: {single:.2f} s (forwards {forwards:.2f} s/tile)")

        times, tiles_run = {}, {}
        for n_workers in worker_counts:
            cluster = local_cluster(n_workers)
            with open_client(client=None, n_workers=None, scheduler=cluster.scheduler_address) as c:
                c.run(_warm)
                t0 = time.perf_counter()
                workers, per_block = set(), []
                for event in run_check_distributed(
                    volume,
                    loaded.module,
                    config,
                    folder / f"w{n_workers}.zarr",
                    model_spec=ModelSpec.from_loaded(loaded),
                    client=c,
                    volume_source=source,
                    divisor=16,
                    share_forwards=not args.no_share,
                ):
                    if isinstance(event, BlockDone):
                        workers.add(event.worker)
                        per_block.append(event.tiles_run)
                    if isinstance(event, RunFinished):
                        layout = event.summary["distributed"]
                        tiles_run[n_workers] = layout["tiles_run"]
                        forwards = _forward_seconds(event.summary) / tiles_run[n_workers]
                        waited = event.summary["timing"].get("shared_wait", 0.0)
                times[n_workers] = time.perf_counter() - t0
            cluster.close()
            print(
                f"{n_workers} worker(s) x 1 thread: {times[n_workers]:.2f} s "
                f"({layout['n_blocks']} block(s) of {tuple(layout['block_chunks'])} chunks "
                f"on {len(workers)} worker(s), "
                f"{tiles_run[n_workers]} tile runs for {plan.n_tiles} tiles "
                f"({' + '.join(map(str, per_block))} by block, {layout.get('tiles_shared', 0)} "
                f"border tiles shared): rerun fraction {layout['rerun_fraction']:.1%}; "
                f"forwards {forwards:.2f} s/tile run; waited for shared tiles {waited:.2f} s)"
            )
        if 1 in times and 2 in times:
            print(f"speed-up 1 -> 2 workers: {times[1] / times[2]:.2f}x")
        if 1 in times:
            print(f"1 worker vs single process: {times[1] / single:.2f}x the time")
        for n_workers in (n for n in worker_counts if n > 1):
            print(f"{n_workers} workers vs single process: {single / times[n_workers]:.2f}x faster")

        import zarr

        reference = zarr.open_group(str(folder / "single.zarr"), mode="r")
        for n_workers in worker_counts:
            root = zarr.open_group(str(folder / f"w{n_workers}.zarr"), mode="r")
            # Seams are opt-in: compare the outputs this run wrote.
            diffs = {
                name: float(np.nanmax(np.abs(root[f"{name}/0"][:] - reference[f"{name}/0"][:])))
                for name in OUTPUTS
                if name in reference
            }
            shown = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
            print(f"{n_workers} worker(s) vs single process, max |difference|: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
