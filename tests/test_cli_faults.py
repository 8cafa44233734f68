"""The command line when a run meets a fault or a signal: one line, exit 2 / 130 / 143, resumable."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from napari_normcheck.cli import main
from napari_normcheck.core.io.lock import lock_path
from napari_normcheck.core.io.store import is_complete
from tests.conftest import calibrate, synthetic_volume, tiny_unet
from tests.core.test_resume import read_outputs
from tests.test_cli import run_args as cli_run_args

ROOT = Path(__file__).parents[1]


@pytest.fixture
def files(tmp_path):
    model = calibrate(tiny_unet("batch"), (1, 16, 32, 32))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    np.save(tmp_path / "volume.npy", synthetic_volume((24, 64, 64)))
    return tmp_path


def run_args(files, volume="volume.npy", out="out.zarr", *extra):
    faults = ("--activation", "sigmoid", "--cache-mb", "0", *extra)
    return cli_run_args(files, *faults, volume=volume, out=out)


def cli_process(argv):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    return subprocess.Popen(
        [sys.executable, "-m", "napari_normcheck.cli", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_once_writing(argv, out: Path, signum: int) -> tuple[int, str]:
    """Run the command line, send ``signum`` once it holds OUT's lock; exit code and stderr."""
    process = cli_process(argv)
    while not lock_path(out).exists():
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.02)
    process.send_signal(signum)
    _, err = process.communicate(timeout=300)
    return process.returncode, err


def test_ctrl_c_and_sigterm_keep_the_work_and_say_how_to_resume(files):
    out = files / "out.zarr"
    reference = cli_process(run_args(files, out="ref.zarr"))
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    code, err = stop_once_writing(run_args(files), out, signal.SIGINT)
    last = err.strip().splitlines()[-1]
    assert code == 130, err
    assert (
        last.startswith("napari-normcheck: interrupted: ")
        and " output chunks are saved in " in last
    )
    resume = shlex.split(last.split("resume with: ", 1)[1])
    assert resume[0] == "napari-normcheck" and resume[-1] == "--resume"
    assert not is_complete(out) and not lock_path(out).exists()

    code, err = stop_once_writing(resume[1:], out, signal.SIGTERM)
    last = err.strip().splitlines()[-1]
    assert code == 143, err
    assert last.startswith("napari-normcheck: SIGTERM: ") and "resume with: " in last

    finish = cli_process(resume[1:])
    assert finish.wait(timeout=300) == 0, finish.stderr.read()
    expected, got = read_outputs(files / "ref.zarr"), read_outputs(out)
    assert got.keys() == expected.keys()
    for name in got:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_corrupt_input_chunk_exits_2_with_one_line(files, capsys):
    source = files / "v.zarr"
    array = zarr.create_array(
        store=str(source),
        shape=(24, 64, 64),
        chunks=(8, 32, 32),
        dtype="float32",
        compressors=zarr.codecs.ZstdCodec(),
    )
    array[:] = np.load(files / "volume.npy")
    (source / "c" / "2" / "1" / "1").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(32))
    assert main(run_args(files, "v.zarr")) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if "napari-normcheck" in x]
    assert len(lines) == 1, lines  # the progress bar, then one line
    err = lines[0]
    assert err.startswith(f"napari-normcheck: error: cannot read the input {source}")
    assert "--resume" in err and f"traceback in {files / 'out.zarr'}" in err


def test_out_on_a_pseudo_filesystem_exits_2_with_one_line(files, capsys):
    if not Path("/proc/self").exists():
        pytest.skip("no /proc filesystem")
    argv = run_args(files)
    argv[argv.index("--out") + 1] = "/proc/normcheck-test.zarr"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "/proc/normcheck-test.zarr" in err, err
    assert err.startswith("napari-normcheck: error: cannot create /proc/normcheck-test.zarr")


def test_out_as_a_url_is_refused(files, capsys):
    argv = run_args(files)
    argv[argv.index("--out") + 1] = "s3://bucket/out.zarr"
    assert main(argv) == 2
    assert "remote writes are not supported" in capsys.readouterr().err
