"""``RunConfig.threads`` (``--threads``): torch's intra-op threads while tiles run, restored after."""

from __future__ import annotations

import threading

import pytest
import torch
import zarr

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.io.volume import open_volume
from napari_normcheck.core.run.engine import run_check
from napari_normcheck.core.run.events import RunFinished
from napari_normcheck.core.run.threads import intra_op_threads
from tests.conftest import calibrate, synthetic_volume, tiny_unet


@pytest.fixture
def process_threads():
    """The process setting before a test, put back after it whatever the test did."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_intra_op_threads_sets_and_restores(process_threads):
    other = process_threads + 1
    with intra_op_threads(other) as n:
        assert n == other == torch.get_num_threads()
    assert torch.get_num_threads() == process_threads
    with intra_op_threads(0) as n:  # 0 keeps the process setting
        assert n == process_threads == torch.get_num_threads()
    with pytest.raises(ValueError, match="threads"):
        with intra_op_threads(-1):
            pass
    assert torch.get_num_threads() == process_threads


def test_overlapping_loops_restore_the_setting_of_before_the_first(process_threads):
    """Two loops in one process (a dask worker's threads) that end in the other order."""
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with intra_op_threads(process_threads + 1):
            first_in.set()
            second_in.wait(30)
        first_out.set()

    def second():
        first_in.wait(30)
        with intra_op_threads(process_threads + 1):
            second_in.set()
            first_out.wait(30)
            seen["while the second still runs"] = torch.get_num_threads()

    workers = [threading.Thread(target=f) for f in (first, second)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert seen == {"while the second still runs": process_threads + 1}
    assert torch.get_num_threads() == process_threads


def test_run_uses_the_threads_while_tiles_run_and_restores_after(tmp_path, process_threads):
    model = calibrate(tiny_unet("batch"), (1, 16, 32, 32))
    seen = []
    model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    volume = open_volume(synthetic_volume((16, 40, 40)))
    wanted = process_threads + 1
    config = RunConfig(tile=(16, 32, 32), threads=wanted)
    events = list(run_check(volume, model, config, tmp_path / "out.zarr"))
    assert isinstance(events[-1], RunFinished)
    assert torch.get_num_threads() == process_threads
    # Every tile's train forward (one tile each) and eval forward ran with the run's threads;
    # the channel probe before the loop ran with the process setting.
    n_tiles = events[0].plan.n_tiles
    assert n_tiles > 1
    assert seen.count(wanted) >= n_tiles + 1
    assert set(seen) <= {wanted, process_threads}
    # The thread count is not a parameter of the results: a resume may use another.
    params = zarr.open_group(str(tmp_path / "out.zarr"), mode="r").attrs["normcheck"]["params"]
    assert "threads" not in params


def test_negative_threads_are_refused():
    with pytest.raises(NormcheckError, match="threads -1"):
        RunConfig(threads=-1)
    assert RunConfig.from_options({"threads": "3"}).threads == 3


def test_results_do_not_depend_on_the_threads(tmp_path, process_threads):
    """--threads 1 and 2 give the same bits: stored float32 predictions, disparity sums and tile
    records. (torch's sigmoid on 2 threads rounds a few values of some tensor sizes otherwise,
    as in the chunks of this volume: 2x2x12x48x48 and the odd ones at its far faces.)"""
    model = calibrate(tiny_unet("batch"), (1, 16, 64, 64))
    volume = synthetic_volume((45, 130, 133))

    def run(threads):
        out = tmp_path / f"t{threads}.zarr"
        config = RunConfig(
            tile=(16, 64, 64), activation="sigmoid", output_dtype="float32", threads=threads
        )
        events = list(run_check(open_volume(volume), model, config, out))
        root = zarr.open_group(str(out), mode="r")
        return events[-1].summary, {n: root[f"{n}/0"][:] for n in ("pred_eval", "pred_train")}

    one, two = run(1), run(2)
    for name in one[1]:
        assert (one[1][name] == two[1][name]).all(), name
    assert one[0]["disparity"] == two[0]["disparity"]
    assert one[0]["support"] == two[0]["support"]
