"""Forwards shared between tile loops through a folder on disk: claims, publications, give-ups."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.io.volume import open_volume
from napari_normcheck.core.run import shared_forwards
from napari_normcheck.core.run.planning import prepare_run
from napari_normcheck.core.run.shared_forwards import SharedForwards
from napari_normcheck.core.run.tile_io import TileWork

NAMES = ("eval", "train")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiles():
    plan = prepare_run(
        open_volume(np.zeros((16, 48, 48), np.float32)), RunConfig(tile=(16, 32, 32))
    ).plan
    return [plan.get_tile(i) for i in range(plan.n_tiles)]


def predicted(tile, seed: int) -> TileWork:
    generator = torch.Generator().manual_seed(seed)
    work = TileWork(tile, np.zeros((1, 16, 32, 32), np.float32))
    work.outputs = {n: torch.randn(2, 16, 32, 32, generator=generator) for n in NAMES}
    work.features = {"enc.conv": np.arange(8, dtype=np.float32).reshape(4, 2) + seed}
    return work


def test_a_shared_tile_is_predicted_by_its_first_claimant_and_received_bit_for_bit(tmp_path, tiles):
    needed_by = {1: (0, 1, 2)}
    loops = [SharedForwards(tmp_path, b, needed_by, CPU, NAMES) for b in range(3)]
    # A tile no other loop runs is this loop's: nothing claimed, nothing written.
    assert loops[1].claim(0)
    loops[1].publish(predicted(tiles[0], 0))
    loops[1].flush()
    assert loops[1].published == 0
    # Loop 2 gets to tile 1 first; loops 0 and 1 receive it.
    assert loops[2].claim(1)
    assert not loops[0].claim(1) and not loops[1].claim(1)
    work = predicted(tiles[1], 7)
    waiting = TileWork(tiles[1], work.image, external=True)
    assert not loops[0].ready(waiting)
    loops[2].publish(work)
    loops[2].flush()  # written in the background
    assert loops[0].ready(waiting)
    for loop in loops[:2]:
        received = TileWork(tiles[1], work.image, external=True)
        assert loop.receive(received)
        for name in NAMES:
            assert received.outputs[name].dtype == torch.float32
            assert torch.equal(received.outputs[name], work.outputs[name])
        np.testing.assert_array_equal(received.features["enc.conv"], work.features["enc.conv"])
    assert loops[0].received == loops[1].received == 1 and loops[2].published == 1
    # The last reader deleted the predictions; a marker says they are gone.
    assert not (tmp_path / "1.npz").exists()
    assert (tmp_path / "gone-1").exists()
    assert not list(tmp_path.glob("*.partial"))


def test_a_claim_never_published_is_given_up_and_its_loop_not_waited_for_again(
    tmp_path, tiles, monkeypatch
):
    monkeypatch.setattr(shared_forwards, "WAIT_SECONDS", 0.2)
    needed_by = {0: (0, 1), 1: (0, 1)}
    dead, alive = (SharedForwards(tmp_path, b, needed_by, CPU, NAMES) for b in (0, 1))
    assert dead.claim(0) and dead.claim(1)  # then its worker dies
    assert not alive.claim(0) and not alive.claim(1)
    t0 = time.perf_counter()
    assert not alive.receive(TileWork(tiles[0], np.zeros(1), external=True))
    assert time.perf_counter() - t0 >= 0.2
    t0 = time.perf_counter()
    assert not alive.receive(TileWork(tiles[1], np.zeros(1), external=True))
    assert time.perf_counter() - t0 < 0.1  # the dead loop is not waited for twice
    assert alive.predicted_after_wait == 2
    # The loop that gave up predicts the tiles and shares them itself.
    alive.publish(predicted(tiles[0], 3))
    alive.close()
    assert alive.published == 1


def test_a_stopped_run_does_not_wait_for_a_claimed_tile(tmp_path, tiles):
    needed_by = {0: (0, 1)}
    claimant = SharedForwards(tmp_path, 0, needed_by, CPU, NAMES)
    waiting = SharedForwards(tmp_path, 1, needed_by, CPU, NAMES, stopped=lambda: True)
    assert claimant.claim(0) and not waiting.claim(0)
    t0 = time.perf_counter()
    assert not waiting.receive(TileWork(tiles[0], np.zeros(1), external=True))
    assert time.perf_counter() - t0 < 1.0


def test_a_retried_block_takes_over_its_own_claims_and_waits_for_a_slow_claimant(tmp_path, tiles):
    needed_by = {0: (0, 1), 1: (0, 1)}
    first_attempt = SharedForwards(tmp_path, 0, needed_by, CPU, NAMES)
    assert first_attempt.claim(0)
    retried = SharedForwards(tmp_path, 0, needed_by, CPU, NAMES)
    assert retried.claim(0)
    # A claimant that publishes a while later is waited for, not predicted again.
    other = SharedForwards(tmp_path, 1, needed_by, CPU, NAMES)
    assert not other.claim(0)
    work = predicted(tiles[0], 5)
    timer = threading.Timer(0.3, lambda: (retried.publish(work), retried.flush()))
    timer.start()
    received = TileWork(tiles[0], work.image, external=True)
    assert other.receive(received)
    timer.join()
    assert torch.equal(received.outputs["train"], work.outputs["train"])
    assert other.waited >= 0.25 and other.predicted_after_wait == 0


def test_a_loop_shares_what_it_claimed_before_it_waits_for_another_loops_tile(
    tmp_path, monkeypatch
):
    """With eval batches of 4, a loop's claimed tiles wait for a full batch; a loop about to wait
    for another loop's tile predicts and publishes them first, or two loops waiting for each
    other would each give up only after the timeout."""
    import dataclasses

    from napari_normcheck.core.run.predictions import CHECK, bind_predictions
    from napari_normcheck.core.run.runsteps import open_outputs, run_attrs
    from napari_normcheck.core.run.tileloop import TileLoop
    from napari_normcheck.core.run.timing import Timing
    from tests.conftest import synthetic_volume, tiny_unet

    monkeypatch.setattr(shared_forwards, "WAIT_SECONDS", 10.0)
    volume = open_volume(synthetic_volume((16, 64, 96)))
    config = RunConfig(tile=(16, 32, 32), overlap=0.25, eval_batch=4)
    setup = dataclasses.replace(prepare_run(volume, config), n_out=2)
    assert setup.eval_batch == 4 and setup.plan.n_tiles >= 6
    names = ("eval", "train")
    store, arrays = open_outputs(
        tmp_path / "o.zarr",
        run_attrs(volume, config, setup, None),
        config,
        setup,
        volume,
        names,
        overwrite=False,
        resume=False,
    )
    folder = tmp_path / "shared"
    needed_by = {t: (0, 1) for t in range(setup.plan.n_tiles)}
    # The other loop claimed tile 0 and shares it only once this loop has shared tile 1.
    other = SharedForwards(folder, 1, needed_by, CPU, names)
    assert other.claim(0)
    reference = predicted(setup.plan.get_tile(0), 11)
    reference.outputs = {n: torch.rand(2, 16, 32, 32) for n in names}

    def other_loop() -> None:
        deadline = time.monotonic() + 30
        while not (folder / "1.npz").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        other.publish(reference)
        other.close()

    thread = threading.Thread(target=other_loop)
    thread.start()
    shared = SharedForwards(folder, 0, needed_by, CPU, names)
    loop = TileLoop(
        volume,
        setup,
        config,
        bind_predictions(tiny_unet("batch").eval(), CHECK, config),
        arrays,
        Timing(),
        tmp_path / "scratch",
        shared=shared,
    )
    t0 = time.perf_counter()
    try:
        done = [r.tile.index for r in loop.run(list(setup.plan.tiles()))]
        loop.flush()
    finally:
        loop.close()
        shared.close()
        thread.join()
        store.release_lock()
    assert done == list(range(setup.plan.n_tiles))
    assert shared.received == 1 and shared.predicted_after_wait == 0
    assert shared.published == setup.plan.n_tiles - 1
    assert time.perf_counter() - t0 < 10.0


def test_a_failed_publication_is_raised_not_lost(tmp_path, tiles):
    import shutil

    folder = tmp_path / "shared"
    loop = SharedForwards(folder, 0, {0: (0, 1)}, CPU, NAMES)
    assert loop.claim(0)
    shutil.rmtree(folder)  # the folder is gone (a full or lost disk fails the same way)
    loop.publish(predicted(tiles[0], 1))
    with pytest.raises(FileNotFoundError):
        loop.close()
