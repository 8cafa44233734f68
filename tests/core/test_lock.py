"""The lock on OUT, between two real processes: a live holder refuses others, a dead one is taken over."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from napari_normcheck.cli import main
from napari_normcheck.core.base.errors import OutputLocked
from napari_normcheck.core.io.lock import OutLock, lock_path
from napari_normcheck.core.io.store import is_complete
from tests import test_cli

HOLDER = textwrap.dedent(
    """
    import sys, time
    from napari_normcheck.cli import main
    from napari_normcheck.core.run import engine

    # The real run, suspended after its first tile: OUT is being written and locked.
    run_check = engine.run_check

    def suspended(*args, **kwargs):
        for event in run_check(*args, **kwargs):
            yield event
            if type(event).__name__ == "TileDone":
                print("READY", flush=True)
                time.sleep(3600)

    import napari_normcheck.core.run.distributed as distributed
    distributed.run_check = suspended
    main(sys.argv[1:])
    """
)

# The command line tests' files and arguments: a tiny BatchNorm U-Net and a synthetic volume.
files = test_cli.files
run_args = test_cli.run_args


def test_live_holder_refuses_a_second_run_and_a_dead_one_is_taken_over(files, capsys):
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    env["PYTHONPATH"] += os.pathsep + str(Path(__file__).parents[2] / "src")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, *run_args(files)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "READY"
        for extra in (("--overwrite",), ("--resume",)):
            assert main(run_args(files, *extra)) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1, err
            assert f"process {holder.pid} on {socket.gethostname()}" in err, err
        assert lock_path(files / "out.zarr").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not is_complete(files / "out.zarr")
    assert main(run_args(files, "--resume")) == 0
    err = capsys.readouterr().err
    assert f"took over the lock on {files / 'out.zarr'} of process {holder.pid}" in err, err
    assert is_complete(files / "out.zarr") and not lock_path(files / "out.zarr").exists()


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    target = tmp_path / "o.zarr"
    lock_path(target).write_text('{"pid": 1, "host": "elsewhere", "started": "2026-01-01"}')
    with pytest.raises(OutputLocked, match="process 1 on elsewhere"):
        OutLock.acquire(target)
    lock_path(target).unlink()
    held = OutLock.acquire(target)
    with pytest.raises(OutputLocked, match=f"process {os.getpid()}"):
        OutLock.acquire(target)  # this process's own live run
    held.release()
    assert not lock_path(target).exists()
