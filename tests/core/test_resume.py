"""Resume: an interrupted run continued in the same OUT equals an uninterrupted one."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import zarr

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.io.store import PROGRESS_FILE, is_complete, records_dir
from napari_normcheck.core.io.volume import open_volume
from napari_normcheck.core.run.engine import run_check
from napari_normcheck.core.run.events import RunFinished, TileDone
from tests.conftest import calibrate, synthetic_volume, tiny_unet

NAMES = (
    "pred_eval",
    "pred_train",
    "disparity",
    "seams_eval",
    "tile_disparity",
    "tile_mismatch_eval",
)


def read_outputs(out):
    """Every level of every output (the pyramid levels are written with their chunks)."""
    root = zarr.open_group(str(out), mode="r")
    arrays = {}
    for name in (n for n in NAMES if n in root):
        for dataset in root[name].attrs["ome"]["multiscales"][0]["datasets"]:
            arrays[f"{name}/{dataset['path']}"] = root[f"{name}/{dataset['path']}"][:]
    return arrays


def summary_of(events):
    return next(e for e in events if isinstance(e, RunFinished)).summary


@pytest.mark.parametrize("stop_after", [1, 6, 10])
def test_cancel_then_resume_equals_uninterrupted(tmp_path, batchnorm_unet, stop_after):
    volume = open_volume(synthetic_volume((40, 48, 52)))  # a 3 x 2 x 2 grid of tiles
    config = RunConfig(
        tile=(16, 32, 32),
        overlap=0.25,
        activation="sigmoid",
        cache_mb=0,
        seams=True,
        pyramid_side=16,  # levels 1 and 2
    )
    reference = summary_of(list(run_check(volume, batchnorm_unet, config, tmp_path / "ref.zarr")))

    out = tmp_path / "o.zarr"
    cancel = threading.Event()
    for event in run_check(volume, batchnorm_unet, config, out, cancel=cancel):
        if isinstance(event, TileDone) and event.n_done == stop_after:
            cancel.set()
    assert not is_complete(out)
    with pytest.raises(NormcheckError, match="already exists"):
        list(run_check(volume, batchnorm_unet, config, out))
    resumed_events = list(run_check(volume, batchnorm_unet, config, out, resume=True))
    n_rerun = sum(isinstance(e, TileDone) for e in resumed_events)
    resumed = summary_of(resumed_events)
    if stop_after >= 10:  # rows 0 and 1 finished every chunk row 0 writes: row 0 is not rerun
        assert n_rerun < reference["n_tiles"]
    expected, got = read_outputs(tmp_path / "ref.zarr"), read_outputs(out)
    assert "pred_eval/2" in got and got.keys() == expected.keys()
    for name in got:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    for key in ("disparity", "mismatch_eval", "mismatch_train"):
        np.testing.assert_allclose(resumed[key]["hard"], reference[key]["hard"], rtol=1e-12)
        np.testing.assert_allclose(resumed[key]["soft"], reference[key]["soft"], rtol=1e-12)
    assert_same_support(resumed, reference)


def assert_same_support(resumed, reference, counts=True):
    """The foreground behind every hard Dice, and the verdict on it, as uninterrupted."""
    got, expected = dict(resumed["support"]), dict(reference["support"])
    for key in ("soft_foreground",):
        np.testing.assert_allclose(got.pop(key), expected.pop(key), rtol=1e-12)
    # Float sums over the tile pairs, added in the order the pairs were finished.
    got_mass, expected_mass = (
        got.pop("mismatch_soft_foreground"),
        expected.pop("mismatch_soft_foreground"),
    )
    assert got_mass.keys() == expected_mass.keys()
    for mode, values in expected_mass.items():
        np.testing.assert_allclose(got_mass[mode], values, rtol=1e-12)
    if not counts:  # progress saved before the counts existed: none made up
        assert got.pop("foreground_voxels") is None and got.pop("foreground_fraction") is None
        expected.pop("foreground_voxels"), expected.pop("foreground_fraction")
    assert got == expected
    assert resumed["verdict_detail"]["channel"] == reference["verdict_detail"]["channel"]
    for mine, theirs in zip(resumed["tiles"], reference["tiles"]):
        for key in ("foreground_voxels", "judged", "mismatch_eval_judged"):
            if counts or key == "mismatch_eval_judged":
                assert mine.get(key) == theirs.get(key), (mine["index"], key)


def test_resume_from_progress_saved_before_the_foreground_counts(tmp_path, batchnorm_unet):
    volume = open_volume(synthetic_volume((40, 48, 52)))
    config = RunConfig(tile=(16, 32, 32), activation="sigmoid", cache_mb=0)
    reference = summary_of(list(run_check(volume, batchnorm_unet, config, tmp_path / "ref.zarr")))
    out = tmp_path / "o.zarr"
    cancel = threading.Event()
    for event in run_check(volume, batchnorm_unet, config, out, cancel=cancel):
        if isinstance(event, TileDone) and event.n_done == 8:
            cancel.set()
    # Make the interrupted run look like one of an earlier version: no counts, no option.
    progress_path = records_dir(out) / PROGRESS_FILE
    progress = json.loads(progress_path.read_text())
    assert "foreground" in progress["disparity_sums"]
    del progress["disparity_sums"]["foreground"]
    for record in progress["tiles"].values():
        del record["foreground_voxels"]
    progress_path.write_text(json.dumps(progress))
    root = zarr.open_group(str(out), mode="r+")
    attrs = dict(root.attrs["normcheck"])
    attrs["params"] = {k: v for k, v in attrs["params"].items() if k != "min_foreground"}
    root.attrs["normcheck"] = attrs
    resumed = summary_of(list(run_check(volume, batchnorm_unet, config, out, resume=True)))
    np.testing.assert_allclose(
        resumed["disparity"]["hard"], reference["disparity"]["hard"], rtol=1e-12
    )
    assert_same_support(resumed, reference, counts=False)


def test_resume_refuses_other_parameters_and_finished_runs(tmp_path, batchnorm_unet):
    volume = open_volume(synthetic_volume((16, 32, 32)))
    config = RunConfig(tile=(16, 32, 32))
    list(run_check(volume, batchnorm_unet, config, tmp_path / "o.zarr"))
    with pytest.raises(NormcheckError, match="already complete"):
        list(run_check(volume, batchnorm_unet, config, tmp_path / "o.zarr", resume=True))
    cancel = threading.Event()
    cancel.set()
    list(run_check(volume, batchnorm_unet, config, tmp_path / "p.zarr", cancel=cancel))
    with pytest.raises(NormcheckError, match="differ"):
        list(
            run_check(
                volume,
                batchnorm_unet,
                config.replace(overlap=0.5),
                tmp_path / "p.zarr",
                resume=True,
            )
        )


def test_kill_9_at_random_points_then_resume(tmp_path):
    model = calibrate(tiny_unet("batch"), (1, 16, 32, 32))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    np.save(tmp_path / "v.npy", synthetic_volume((24, 64, 64)))
    kwargs = json.dumps(
        {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 2,
            "features": [4, 4, 8, 8, 16, 4],
            "norm": "batch",
        }
    )

    def command(out, *extra):
        return [
            sys.executable,
            "-m",
            "napari_normcheck.cli",
            "run",
            str(tmp_path / "v.npy"),
            "--model",
            str(tmp_path / "m.pt"),
            "--arch",
            "monai.networks.nets.BasicUNet",
            "--arch-kwargs",
            kwargs,
            "--out",
            str(out),
            "--tile",
            "16,32,32",
            "--activation",
            "sigmoid",
            "--cache-mb",
            "0",
            *extra,
        ]

    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run(command(tmp_path / "ref.zarr"), check=True, env=env, capture_output=True)
    rng = np.random.default_rng(0)
    out = tmp_path / "o.zarr"
    for _attempt in range(3):
        extra = ("--resume",) if out.exists() else ()
        process = subprocess.Popen(
            command(out, *extra), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(float(rng.uniform(4.0, 9.0)))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()
    extra = ("--resume",) if out.exists() and not is_complete(out) else ()
    if not is_complete(out):
        subprocess.run(command(out, *extra), check=True, env=env, capture_output=True)
    expected, got = read_outputs(tmp_path / "ref.zarr"), read_outputs(out)
    assert got.keys() == expected.keys()
    for name in got:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_saved_progress_lists_a_record_for_every_tile_whose_chunks_are_done(
    tmp_path, batchnorm_unet
):
    # Tile metrics run while the next tile is stitched: a snapshot waits for them, so every tile
    # that a listed chunk was summed from (a resumed run does not rerun a tile whose chunks are all
    # listed) has its record and the pairs it completed.
    from napari_normcheck.core.base.tiling import plan_tiles
    from napari_normcheck.core.measure.mismatch import tile_pairs

    volume = open_volume(synthetic_volume((40, 48, 52)))
    config = RunConfig(tile=(16, 32, 32), overlap=0.25, cache_mb=0)
    plan = plan_tiles(volume.spatial_shape, config.tile, overlap=0.25)
    for stop in (3, 7, 10):
        out = tmp_path / f"o{stop}.zarr"
        cancel = threading.Event()
        for event in run_check(volume, batchnorm_unet, config, out, cancel=cancel):
            if isinstance(event, TileDone) and event.n_done == stop:
                cancel.set()
        progress = json.loads((records_dir(out) / PROGRESS_FILE).read_text())
        done = {tuple(c) for c in progress["done_chunks"]}
        summed = {
            t.index
            for t in plan.tiles()
            if any(
                c in done for c in itertools.product(*(range(a, b) for a, b in plan.chunk_range(t)))
            )
        }
        assert summed, stop
        assert {str(i) for i in summed} <= set(progress["tiles"]), stop
        pairs = {tuple(int(v) for v in key.split(",")) for key in progress["pair_sums"]}
        for j in summed:
            assert {(i, j) for i, _ in tile_pairs(plan)[j] if i < j} <= pairs, (stop, j)
