"""Distributed runs against the single-process run, on a real cluster of two worker processes.

The cluster is started the way users start one (``dask scheduler`` and ``dask worker`` processes), so
every test goes through the scheduler-address path; one test starts its own ``LocalCluster``
(``n_workers``). Models reach workers as a file and loader options, as the command line gives them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.io.store import is_complete
from napari_normcheck.core.io.volume import open_volume
from napari_normcheck.core.models.models import load_model
from napari_normcheck.core.models.modelspec import ModelSpec
from napari_normcheck.core.run.distributed import open_client, run_check_distributed
from napari_normcheck.core.run.engine import run_check
from napari_normcheck.core.run.events import BlockDone, RunFinished, TileDone
from napari_normcheck.core.run.leftovers import blocks_dir
from tests.conftest import TINY_UNET_ARCH, calibrate, synthetic_volume, tiny_unet, tiny_unet_kwargs

distributed = pytest.importorskip("distributed")

ARRAYS = (
    "pred_eval",
    "pred_train",
    "disparity",
    "seams_eval",
    "seams_train",
    "tile_disparity",
    "tile_disparity_soft",
    "tile_mismatch_eval",
    "tile_mismatch_train",
    "feature_z",
)
ARCH = TINY_UNET_ARCH
ARCH_KWARGS = tiny_unet_kwargs("batch")
SHAPE = (28, 48, 52)  # 2 x 2 x 2 tiles of 16 x 32 x 32
CONFIGS = {
    # Pyramid levels down to 16 voxels a side: the blocks write their chunks' levels too.
    "gaussian": RunConfig(
        tile=(16, 32, 32), overlap=0.25, activation="sigmoid", seams=True, pyramid_side=16
    ),
    "constant": RunConfig(
        tile=(16, 32, 32), overlap=0.25, blend="constant", activation="softmax", seams=True
    ),
    # Train batches of three tiles share batch statistics: blocks must run the same batches.
    "crop": RunConfig(
        tile=(16, 32, 32),
        blend="crop",
        halo=(0, 8, 8),
        activation="sigmoid",
        train_batch=3,
        seams=True,
    ),
}
BLOCKS = {"gaussian": (2, 2, 2), "constant": (2, 1, 2), "crop": (1, 2, 1)}  # 4, 8, 4 blocks


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


@pytest.fixture(scope="module")
def scheduler_address(tmp_path_factory):
    """A scheduler and a worker with two one-thread processes, each started as its own command."""
    folder = tmp_path_factory.mktemp("cluster")
    scheduler_file = folder / "scheduler.json"
    # The workers import this checkout's package (and tests), as the test process does.
    repo = Path(__file__).parents[2]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{repo}{os.pathsep}{repo / 'src'}"}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    dask = [sys.executable, "-m", "dask"]
    scheduler = subprocess.Popen(
        [*dask, "scheduler", "--port", "0", "--no-dashboard", "--scheduler-file", scheduler_file],
        **quiet,
    )
    worker = None
    try:
        wait_for(scheduler_file.exists, 60, "scheduler did not start")
        worker = subprocess.Popen(
            [
                *dask,
                "worker",
                "--scheduler-file",
                str(scheduler_file),
                "--nworkers",
                "2",
                "--nthreads",
                "1",
                "--no-dashboard",
                "--local-directory",
                str(folder),
            ],
            **quiet,
        )
        address = json.loads(scheduler_file.read_text())["address"]
        with distributed.Client(address) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for process in (worker, scheduler):
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()


@pytest.fixture(scope="module")
def client(scheduler_address):
    with distributed.Client(scheduler_address) as connected:
        yield connected


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    model = calibrate(tiny_unet("batch"), (1, 16, 32, 32))
    torch.save(model.state_dict(), folder / "m.pt")
    np.save(folder / "v.npy", synthetic_volume(SHAPE))
    return folder


@pytest.fixture(scope="module")
def loaded(model_file):
    return load_model(model_file / "m.pt", arch=ARCH, arch_kwargs=ARCH_KWARGS)


@pytest.fixture(scope="module")
def volume():
    return open_volume(synthetic_volume(SHAPE))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, loaded, volume):
    """Single-process runs, one per configuration, computed once."""
    folder = tmp_path_factory.mktemp("reference")
    cache = {}

    def get(kind):
        if kind not in cache:
            out = folder / f"{kind}.zarr"
            # The workers run torch on one thread (OMP_NUM_THREADS=1); a batched convolution's
            # float rounding depends on the thread count, so the reference uses one thread too.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                events = list(run_check(volume, loaded.module, CONFIGS[kind], out))
            finally:
                torch.set_num_threads(threads)
            cache[kind] = (read_arrays(out), events[-1].summary, out)
        return cache[kind]

    return get


def read_arrays(out):
    root = zarr.open_group(str(out), mode="r")
    arrays = {}
    for name in ARRAYS:
        for dataset in root[name].attrs["ome"]["multiscales"][0]["datasets"]:
            key = name if dataset["path"] == "0" else f"{name}/{dataset['path']}"
            arrays[key] = root[f"{name}/{dataset['path']}"][:]
    return arrays


def summary_of(events):
    finished = [e for e in events if isinstance(e, RunFinished)]
    assert len(finished) == 1
    return finished[0].summary


def assert_same_run(out, summary, expected, *, exact: bool):
    expected_arrays, expected_summary, _ = expected
    got = read_arrays(out)
    assert got.keys() == expected_arrays.keys()
    for name in got:
        if exact:
            np.testing.assert_array_equal(got[name], expected_arrays[name], err_msg=name)
        else:
            np.testing.assert_allclose(
                got[name], expected_arrays[name], atol=1e-6, rtol=0, err_msg=name
            )
    for key in ("disparity", "mismatch_eval", "mismatch_train"):
        for kind, values in expected_summary[key].items():
            if exact:
                assert summary[key][kind] == values, (key, kind)
            else:
                np.testing.assert_allclose(summary[key][kind], values, atol=1e-6, rtol=0)
    assert summary["n_tile_pairs"] == expected_summary["n_tile_pairs"]
    # The foreground behind every hard Dice, merged from the blocks, and the verdict on it.
    got_support, expected_support = dict(summary["support"]), dict(expected_summary["support"])
    np.testing.assert_allclose(
        got_support.pop("soft_foreground"),
        expected_support.pop("soft_foreground"),
        rtol=0 if exact else 1e-6,
    )
    # Float sums over the tile pairs, added in the order the blocks return them.
    got_mass, expected_mass = (
        s.pop("mismatch_soft_foreground") for s in (got_support, expected_support)
    )
    assert got_mass.keys() == expected_mass.keys()
    for mode, values in expected_mass.items():
        np.testing.assert_allclose(got_mass[mode], values, rtol=1e-12 if exact else 1e-6)
    assert got_support == expected_support
    assert summary["verdict"] == expected_summary["verdict"]
    assert len(summary["tiles"]) == len(expected_summary["tiles"])
    for mine, theirs in zip(summary["tiles"], expected_summary["tiles"]):
        assert mine["index"] == theirs["index"]
        for key in ("disparity_hard", "disparity_soft", "mismatch_eval", "mismatch_train"):
            np.testing.assert_allclose(mine[key], theirs[key], atol=0 if exact else 1e-6)
        for key in ("foreground_voxels", "judged", "mismatch_eval_judged"):
            assert mine[key] == theirs[key], (mine["index"], key)
        for layer, stats in theirs["features"].items():
            for stat in ("mean", "var", "z"):
                np.testing.assert_allclose(
                    mine["features"][layer][stat], stats[stat], rtol=0 if exact else 1e-6
                )
    assert is_complete(out)
    assert not blocks_dir(out).exists()


def distributed_run(volume, loaded, kind, out, **kwargs):
    return run_check_distributed(
        volume,
        loaded.module,
        CONFIGS[kind],
        out,
        model_spec=ModelSpec.from_loaded(loaded),
        block_chunks=kwargs.pop("block_chunks", BLOCKS[kind]),
        **kwargs,
    )


def test_equals_single_process_bitwise_in_crop_mode(tmp_path, client, loaded, volume, reference):
    kind = "crop"
    saved = {k: v.clone() for k, v in loaded.module.state_dict().items()}
    events = list(distributed_run(volume, loaded, kind, tmp_path / "o.zarr", client=client))
    summary = summary_of(events)
    assert_same_run(tmp_path / "o.zarr", summary, reference(kind), exact=kind == "crop")
    # Every tile reported once, every block once; tiles on block borders ran in several blocks.
    tiles = [e.tile.index for e in events if isinstance(e, TileDone)]
    assert sorted(tiles) == list(range(summary["n_tiles"]))
    assert (
        len([e for e in events if isinstance(e, BlockDone)]) == summary["distributed"]["n_blocks"]
    )
    assert summary["distributed"]["tiles_run"] > summary["n_tiles"]
    for key, value in loaded.module.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_border_tiles_are_predicted_once_and_shared_bit_for_bit(tmp_path, client, loaded, volume):
    """Blocks share their border tiles' forwards: every tile predicted once, the same outputs and
    sums as blocks that each predict every tile they touch (on the same one-thread workers)."""
    runs = {}
    for share in (True, False):
        out = tmp_path / f"{share}.zarr"
        events = list(
            distributed_run(volume, loaded, "gaussian", out, client=client, share_forwards=share)
        )
        runs[share] = (read_arrays(out), summary_of(events), out)
    shared, alone = runs[True][1]["distributed"], runs[False][1]["distributed"]
    n_tiles = runs[True][1]["n_tiles"]
    assert shared["n_blocks"] == 4 and 0 < shared["tiles_shared"] <= n_tiles
    assert shared["tiles_run"] == n_tiles and shared["rerun_fraction"] == 0.0
    assert shared["tiles_not_received"] == 0
    assert alone["tiles_run"] > n_tiles and alone["tiles_shared"] == 0
    assert shared["layout_rerun_fraction"] == alone["rerun_fraction"]
    assert_same_run(runs[True][2], runs[True][1], runs[False], exact=True)
    assert not (runs[True][2] / ".scratch").exists()


def test_local_cluster_has_one_thread_per_worker_process():
    """``n_workers`` (``--workers N``) starts worker processes of one thread each, closed after."""
    with open_client(n_workers=2) as local:
        assert sorted(local.nthreads().values()) == [1, 1]
        pids = set(local.run(os.getpid).values())
        # Not dask's MALLOC_TRIM_THRESHOLD_=65536 (it slows every tile's allocations): the
        # workers inherit this process's setting, whatever it is.
        trims = local.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        assert set(trims.values()) == {os.environ.get("MALLOC_TRIM_THRESHOLD_")}
        cluster = local.cluster
    assert len(pids) == 2 and os.getpid() not in pids
    assert cluster.status.name == "closed"


def test_failed_overwrite_keeps_the_earlier_output(tmp_path, client, loaded, reference):
    """A run that fails on a worker (NaN in the input) leaves an earlier complete OUT untouched."""
    out = tmp_path / "o.zarr"
    bad = synthetic_volume(SHAPE)
    bad[3, 40, 45] = np.nan
    with pytest.raises(NormcheckError, match="already exists"):
        list(distributed_run(open_volume(bad), loaded, "crop", reference("crop")[2], client=client))
    shutil.copytree(reference("crop")[2], out)
    with pytest.raises(NormcheckError, match="NaN or Inf"):
        list(
            distributed_run(
                open_volume(bad), loaded, "crop", out, client=client, overwrite=True, retries=0
            )
        )
    assert is_complete(out)
    np.testing.assert_array_equal(
        zarr.open_group(str(out), mode="r")["pred_eval/0"][:], reference("crop")[0]["pred_eval"]
    )


def test_default_blocks(tmp_path, client, loaded, volume, reference):
    events = list(
        run_check_distributed(
            volume,
            loaded.module,
            CONFIGS["gaussian"],
            tmp_path / "o.zarr",
            model_spec=ModelSpec.from_loaded(loaded),
            client=client,
        )
    )
    summary = summary_of(events)
    assert summary["distributed"]["worker_threads"] == 2
    assert summary["distributed"]["n_blocks"] >= 2
    assert_same_run(tmp_path / "o.zarr", summary, reference("gaussian"), exact=False)


def test_cancel_then_resume_runs_only_unfinished_blocks(
    tmp_path, client, loaded, volume, reference
):
    out = tmp_path / "o.zarr"
    cancel = threading.Event()
    first = []
    for event in distributed_run(volume, loaded, "crop", out, client=client, cancel=cancel):
        first.append(event)
        if isinstance(event, BlockDone):
            cancel.set()
    done_before = {e.block for e in first if isinstance(e, BlockDone)}
    assert done_before and not is_complete(out)
    with pytest.raises(NormcheckError, match="already exists"):
        list(distributed_run(volume, loaded, "crop", out, client=client))
    with pytest.raises(NormcheckError, match="differ"):
        list(
            run_check_distributed(
                volume,
                loaded.module,
                CONFIGS["crop"].replace(halo=(0, 16, 16)),
                out,
                model_spec=ModelSpec.from_loaded(loaded),
                client=client,
                resume=True,
            )
        )
    resumed = list(distributed_run(volume, loaded, "crop", out, client=client, resume=True))
    rerun = {e.block for e in resumed if isinstance(e, BlockDone)}
    summary = summary_of(resumed)
    assert not rerun & done_before
    assert len(rerun) < summary["distributed"]["n_blocks"]
    assert_same_run(out, summary, reference("crop"), exact=True)


CLIENT_SCRIPT = """
import json, sys
from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.run.distributed import run_events
from napari_normcheck.core.models.models import load_model
from napari_normcheck.core.io.volume import open_volume

model, arch_kwargs, npy, config, out, address = sys.argv[1:]
loaded = load_model(model, arch="monai.networks.nets.BasicUNet", arch_kwargs=arch_kwargs)
config = RunConfig.from_dict(json.loads(config))
for event in run_events(
    open_volume(npy), loaded, config, out, scheduler=address, volume_source={"source": npy},
    block_chunks=(1, 1, 1),
):
    print(type(event).__name__, flush=True)
"""


def test_client_killed_then_resume(tmp_path, scheduler_address, client, model_file, reference):
    """A client process killed mid-run (kill -9); resuming reruns only blocks not recorded."""
    out = tmp_path / "o.zarr"
    npy = model_file / "v.npy"
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    arguments = [
        str(model_file / "m.pt"),
        json.dumps(ARCH_KWARGS),
        str(npy),
        json.dumps(CONFIGS["crop"].to_dict()),
        str(out),
        scheduler_address,
    ]
    # The workers import this checkout's package (and tests), as the test process does.
    repo = Path(__file__).parents[2]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{repo}{os.pathsep}{repo / 'src'}"}
    process = subprocess.Popen(
        [sys.executable, str(script), *arguments],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: any(blocks_dir(out).glob("block_*.json")), 120, "no block finished")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    recorded = {int(p.stem.split("_")[1]) for p in blocks_dir(out).glob("block_*.json")}
    assert not is_complete(out)
    loaded = load_model(model_file / "m.pt", arch=ARCH, arch_kwargs=ARCH_KWARGS)
    resumed = list(
        run_check_distributed(
            open_volume(npy),
            loaded.module,
            CONFIGS["crop"],
            out,
            model_spec=ModelSpec.from_loaded(loaded),
            scheduler=scheduler_address,
            volume_source={"source": str(npy)},
            resume=True,
        )
    )
    summary = summary_of(resumed)
    rerun = {e.block for e in resumed if isinstance(e, BlockDone)}
    assert summary["distributed"]["block_chunks"] == [1, 1, 1]  # the interrupted run's blocks
    assert not rerun & recorded
    assert len(rerun) < summary["distributed"]["n_blocks"]
    assert_same_run(out, summary, reference("crop"), exact=True)


def test_worker_killed_mid_run(tmp_path, client, loaded, volume, reference):
    """kill -9 of a worker process after the first block: its blocks run again elsewhere.

    Last in this module: the nanny restarts the worker in the background.
    """
    pids = client.run(os.getpid)
    events = []
    killed_at = None
    for event in distributed_run(volume, loaded, "constant", tmp_path / "o.zarr", client=client):
        events.append(event)
        if isinstance(event, BlockDone) and killed_at is None:
            os.kill(next(iter(pids.values())), signal.SIGKILL)
            killed_at = len(events)
    assert killed_at is not None
    assert any(isinstance(e, BlockDone) for e in events[killed_at:])  # blocks ran after the kill
    assert_same_run(tmp_path / "o.zarr", summary_of(events), reference("constant"), exact=False)


def test_run_with_remedies_on_the_cluster_equals_single_process(
    tmp_path, scheduler_address, loaded, volume
):
    """``run --remedies`` on a cluster: the remedies' variants are built on the workers."""
    from napari_normcheck.core.remedies.check_remedies import check_with_remedies
    from napari_normcheck.core.remedies.remedy_run import RemediesFinished
    from napari_normcheck.core.remedies.variants import REMEDIES

    config = CONFIGS["gaussian"]
    options = {"remedies": REMEDIES, "recalibration": {"n_tiles": 2, "holdout": 1}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run
    try:
        single = list(check_with_remedies(volume, loaded, config, tmp_path / "one.zarr", **options))
        spread = list(
            check_with_remedies(
                volume,
                loaded,
                config,
                tmp_path / "many.zarr",
                scheduler=scheduler_address,
                block_chunks=BLOCKS["gaussian"],
                **options,
            )
        )
    finally:
        torch.set_num_threads(threads)
    assert any(isinstance(e, BlockDone) for e in spread)
    for name in ("pred_recalibrated", "pred_batchstats", "pred_eval", "disparity"):
        np.testing.assert_allclose(
            zarr.open_group(str(tmp_path / "many.zarr"), mode="r")[f"{name}/0"][...],
            zarr.open_group(str(tmp_path / "one.zarr"), mode="r")[f"{name}/0"][...],
            atol=1e-6,
            rtol=0,
            err_msg=name,
        )
    tables = [
        next(e for e in events if isinstance(e, RemediesFinished)).remedies
        for events in (single, spread)
    ]
    for row in REMEDIES:
        for key in ("disparity_vs_train", "mismatch"):
            for kind, values in tables[0][row][key].items():
                np.testing.assert_allclose(tables[1][row][key][kind], values, atol=1e-6)
