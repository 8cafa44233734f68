"""A grid-shift run on a dask cluster equals the single-process run."""

from __future__ import annotations

import numpy as np
import torch
import zarr

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.io.volume import open_volume
from napari_normcheck.core.models.models import load_model
from napari_normcheck.core.models.modelspec import ModelSpec
from napari_normcheck.core.run.distributed import run_check_distributed
from napari_normcheck.core.run.engine import run_check
from napari_normcheck.core.run.events import BlockDone, RunFinished, TileDone
from tests.conftest import TINY_UNET_ARCH, calibrate, synthetic_volume, tiny_unet, tiny_unet_kwargs

OUTPUTS = (
    "pred_eval",
    "shifted_pred_eval",
    "shifted_pred_train",
    "shift_diff_eval",
    "shift_diff_train",
)


def test_grid_shift_on_a_cluster_equals_single_process(tmp_path):
    model = calibrate(tiny_unet("batch"), (1, 16, 32, 32))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    loaded = load_model(
        tmp_path / "m.pt", arch=TINY_UNET_ARCH, arch_kwargs=tiny_unet_kwargs("batch")
    )
    volume = open_volume(synthetic_volume((16, 48, 52)))
    config = RunConfig(
        tile=(16, 32, 32), blend="crop", halo=(0, 8, 8), activation="sigmoid", grid_shift=0.5
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: a convolution's rounding depends on the threads
    try:
        single = list(run_check(volume, loaded.module, config, tmp_path / "single.zarr"))[-1]
        events = list(
            run_check_distributed(
                volume,
                loaded.module,
                config,
                tmp_path / "cluster.zarr",
                model_spec=ModelSpec.from_loaded(loaded),
                n_workers=2,
                block_chunks=(1, 1, 1),
            )
        )
    finally:
        torch.set_num_threads(threads)
    finished = events[-1]
    assert isinstance(finished, RunFinished)
    done = [e for e in events if isinstance(e, TileDone)]
    assert [e.n_done for e in done] == list(range(1, len(done) + 1))
    assert done[-1].n_total == len(done)
    expected, got = single.summary, finished.summary
    assert got["grid_shift_offset"] == expected["grid_shift_offset"] == [0, 16, 16]
    for name in ("eval", "train"):
        for kind in ("hard", "soft"):
            np.testing.assert_allclose(
                got["grid_shift"][name][kind], expected["grid_shift"][name][kind], atol=1e-7
            )
    np.testing.assert_allclose(
        [t["grid_shift_eval"] for t in got["tiles"]],
        [t["grid_shift_eval"] for t in expected["tiles"]],
        atol=1e-7,
    )
    a = zarr.open_group(str(tmp_path / "single.zarr"), mode="r")
    b = zarr.open_group(str(tmp_path / "cluster.zarr"), mode="r")
    for name in (*OUTPUTS, "tile_grid_shift_eval"):
        np.testing.assert_allclose(b[f"{name}/0"][:], a[f"{name}/0"][:], atol=1e-6, err_msg=name)


def stored_arrays(out):
    """Every level of every output of OUT, by ``name/level``."""
    root = zarr.open_group(str(out), mode="r")
    arrays = {}
    for name in root.group_keys():
        for level in root[name].array_keys():
            arrays[f"{name}/{level}"] = root[f"{name}/{level}"][:]
    return arrays


def test_cluster_run_cancelled_in_the_shifted_grid_then_resumed_equals_uninterrupted(tmp_path):
    import threading

    from distributed import Client, LocalCluster

    from napari_normcheck.core.io.store import read_progress

    model = calibrate(tiny_unet("batch"), (1, 16, 32, 32))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    loaded = load_model(
        tmp_path / "m.pt", arch=TINY_UNET_ARCH, arch_kwargs=tiny_unet_kwargs("batch")
    )
    volume = open_volume(synthetic_volume((16, 64, 64)))
    config = RunConfig(
        tile=(16, 32, 32),
        blend="crop",
        halo=(0, 8, 8),
        activation="sigmoid",
        grid_shift=0.5,
        pyramid_side=16,
    )
    spec = ModelSpec.from_loaded(loaded)

    def cluster_run(out, client, **options):
        return run_check_distributed(
            volume,
            loaded.module,
            config,
            out,
            model_spec=spec,
            client=client,
            block_chunks=(1, 1, 1),
            **options,
        )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shifted grid runs in this process
    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    try:
        with Client(cluster) as client:
            events = list(cluster_run(tmp_path / "ref.zarr", client))
            reference = events[-1].summary
            # The shifted grid's tiles are reported first, then the blocks' tiles.
            n_shifted = sum(isinstance(e, TileDone) for e in events) - reference["n_tiles"]
            assert n_shifted > 2
            out = tmp_path / "o.zarr"
            cancel = threading.Event()
            first = []
            for event in cluster_run(out, client, cancel=cancel):
                first.append(event)
                if isinstance(event, TileDone) and event.n_done == 2:
                    cancel.set()
            assert not any(isinstance(e, RunFinished) for e in first)
            # Stopped in the shifted grid: some of its chunks are saved, no block ran.
            assert read_progress(out)["grid_shift_done"]
            assert not any(isinstance(e, BlockDone) for e in first)
            resumed = list(cluster_run(out, client, resume=True))
    finally:
        cluster.close()
        torch.set_num_threads(threads)
    finished = resumed[-1]
    assert isinstance(finished, RunFinished)
    for key in ("grid_shift", "grid_shift_offset", "disparity", "mismatch_eval"):
        assert finished.summary[key] == reference[key], key
    assert [t.get("grid_shift_eval") for t in finished.summary["tiles"]] == [
        t.get("grid_shift_eval") for t in reference["tiles"]
    ]
    expected, got = stored_arrays(tmp_path / "ref.zarr"), stored_arrays(out)
    assert got.keys() == expected.keys() and "shift_diff_eval/1" in got
    for name in got:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
