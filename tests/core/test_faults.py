"""Faults during a run: a damaged input chunk, a full disk, an OUT that cannot be created.

Each ends in one :class:`~napari_normcheck.core.base.errors.RunFault` line naming cause, place and
fix, with the traceback in a log file; ``--resume`` after the cause is gone equals an uninterrupted
run, bitwise.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.errors import (
    InputReadError,
    NormcheckError,
    OutputWriteError,
)
from napari_normcheck.core.io.store import is_complete, read_marker, read_progress
from napari_normcheck.core.io.volume import open_volume
from napari_normcheck.core.run.engine import run_check
from tests.conftest import synthetic_volume
from tests.core.test_resume import read_outputs

CONFIG = RunConfig(
    tile=(16, 32, 32), overlap=0.25, activation="sigmoid", cache_mb=0, seams=True, pyramid_side=16
)


def zstd_volume(path: Path) -> Path:
    """The synthetic volume as a zarr v3 array, zstd-compressed in small chunks."""
    array = zarr.create_array(
        store=str(path),
        shape=(40, 48, 52),
        chunks=(8, 16, 16),
        dtype="float32",
        compressors=zarr.codecs.ZstdCodec(),
    )
    array[:] = synthetic_volume((40, 48, 52))
    return path


def assert_same_outputs(got: Path, expected: Path) -> None:
    a, b = read_outputs(got), read_outputs(expected)
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert read_marker(got)["disparity"] == read_marker(expected)["disparity"]


def test_corrupt_input_chunk_one_line_then_resume_equals_uninterrupted(tmp_path, batchnorm_unet):
    source = zstd_volume(tmp_path / "v.zarr")
    volume = open_volume(source)
    list(run_check(volume, batchnorm_unet, CONFIG, tmp_path / "ref.zarr"))

    chunk = source / "c" / "4" / "2" / "3"  # z 32:40, y 32:48, x 48:52: read by the last tiles
    intact = chunk.read_bytes()
    chunk.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(range(64)))  # a zstd magic, then garbage
    out = tmp_path / "o.zarr"
    with pytest.raises(InputReadError) as info:
        list(run_check(open_volume(source), batchnorm_unet, CONFIG, out))
    line = str(info.value)
    assert "\n" not in line and str(source) in line, line
    assert "in the chunk z 32:40, y 32:48, x 48:52" in line, line
    assert "--resume" in line
    log = Path(line.rsplit("traceback in ", 1)[1])
    assert log.parent.parent == out and "Traceback" in log.read_text()
    assert not is_complete(out) and read_progress(out)["done_chunks"]  # work before it was kept

    chunk.write_bytes(intact)  # the chunk copied again
    list(run_check(open_volume(source), batchnorm_unet, CONFIG, out, resume=True))
    assert_same_outputs(out, tmp_path / "ref.zarr")
    assert not (out / ".normcheck").exists()  # the log went with the records of the run


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
    )
    return done.returncode == 0


def test_full_disk_one_line_then_resume_equals_uninterrupted(tmp_path, batchnorm_unet):
    volume = open_volume(synthetic_volume((40, 48, 52)))
    list(run_check(volume, batchnorm_unet, CONFIG, tmp_path / "ref.zarr"))
    disk = tmp_path / "disk"
    if shutil.which("mount") is None or not _mount_tmpfs(disk, "160k"):
        pytest.skip("mounting a small tmpfs is not permitted here (needs root)")
    try:
        out = disk / "o.zarr"
        with pytest.raises(OutputWriteError) as info:
            list(run_check(volume, batchnorm_unet, CONFIG, out))
        line = str(info.value)
        assert "\n" not in line and line.startswith(f"no space left on the device of {out}"), line
        assert "needs at most" in line and "--resume" in line
        assert "traceback in " in line
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        list(run_check(volume, batchnorm_unet, CONFIG, out, resume=True))
        assert_same_outputs(out, tmp_path / "ref.zarr")
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("where", ["proc", "read-only"])
def test_out_that_cannot_be_created_is_one_line(tmp_path, batchnorm_unet, where):
    volume = open_volume(synthetic_volume((16, 32, 32)))
    if where == "proc":
        if not Path("/proc/self").exists():
            pytest.skip("no /proc filesystem")
        out = Path("/proc/normcheck-test.zarr")
    else:
        disk = tmp_path / "ro"
        disk.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(disk)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip("mounting a read-only tmpfs is not permitted here (needs root)")
        out = disk / "o.zarr"
    try:
        with pytest.raises(NormcheckError, match=r"^cannot (create|write) ") as info:
            list(run_check(volume, batchnorm_unet, RunConfig(tile=(16, 32, 32)), out))
        assert "\n" not in str(info.value) and str(out) in str(info.value)
    finally:
        if where != "proc":
            subprocess.run(["umount", "-l", str(out.parent)], check=False)


def test_finished_out_opens_in_zarr_without_warnings(tmp_path, batchnorm_unet):
    volume = open_volume(synthetic_volume((16, 32, 32)))
    out = tmp_path / "o.zarr"
    list(run_check(volume, batchnorm_unet, RunConfig(tile=(16, 32, 32)), out))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        root = zarr.open_group(str(out), mode="r")
        names = set(root.group_keys())
        members = dict(root.members(max_depth=None))
    assert {"pred_eval", "pred_train", "disparity"} <= names and members
    assert is_complete(out) and read_marker(out)["n_tiles"] == 1
    assert sorted(p.name for p in out.iterdir() if not (p / "zarr.json").exists()) == ["zarr.json"]


def test_stores_of_earlier_versions_still_read_and_resume(tmp_path, batchnorm_unet):
    """``COMPLETE.json`` and ``progress.json`` at the root (the earlier layout) are still read."""
    import json
    import threading

    volume = open_volume(synthetic_volume((40, 48, 52)))
    list(run_check(volume, batchnorm_unet, CONFIG, tmp_path / "ref.zarr"))
    out = tmp_path / "o.zarr"
    cancel = threading.Event()
    for n, _ in enumerate(run_check(volume, batchnorm_unet, CONFIG, out, cancel=cancel)):
        if n == 4:
            cancel.set()
    (out / ".normcheck" / "progress.json").rename(out / "progress.json")  # the old place
    (out / ".normcheck").rmdir()
    assert read_progress(out)["done_chunks"]
    list(run_check(volume, batchnorm_unet, CONFIG, out, resume=True))
    assert_same_outputs(out, tmp_path / "ref.zarr")
    assert not (out / "progress.json").exists()

    old = tmp_path / "old.zarr"
    shutil.copytree(tmp_path / "ref.zarr", old)
    meta = json.loads((old / "zarr.json").read_text())
    summary = meta["attributes"].pop("normcheck_summary")
    (old / "zarr.json").write_text(json.dumps(meta))
    (old / "COMPLETE.json").write_text(json.dumps(summary))
    assert is_complete(old) and read_marker(old)["n_tiles"] == summary["n_tiles"]


def test_worker_failure_is_one_line_and_resume_equals_uninterrupted(tmp_path):
    """A block failing on a cluster worker (a damaged input chunk): one line, then --resume."""
    distributed = pytest.importorskip("distributed")
    import torch

    from napari_normcheck.core.base.errors import RunFault
    from napari_normcheck.core.models.models import load_model
    from napari_normcheck.core.models.modelspec import ModelSpec
    from napari_normcheck.core.run.distributed import run_check_distributed
    from tests.conftest import TINY_UNET_ARCH, calibrate, tiny_unet, tiny_unet_kwargs

    torch.save(calibrate(tiny_unet("batch"), (1, 16, 32, 32)).state_dict(), tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt", arch=TINY_UNET_ARCH, arch_kwargs=tiny_unet_kwargs())
    source = zstd_volume(tmp_path / "v.zarr")
    volume_source = {"source": str(source), "dataset": None, "level": 0, "channel_axis": "auto"}

    def run(out, **kwargs):
        return list(
            run_check_distributed(
                open_volume(source),
                loaded.module,
                CONFIG,
                out,
                model_spec=ModelSpec.from_loaded(loaded),
                block_chunks=(2, 2, 2),
                volume_source=volume_source,
                client=client,
                retries=0,
                **kwargs,
            )
        )

    cluster = distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
    )
    with cluster, distributed.Client(cluster) as client:
        run(tmp_path / "ref.zarr")
        chunk = source / "c" / "4" / "2" / "3"
        intact = chunk.read_bytes()
        chunk.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(range(64)))
        out = tmp_path / "o.zarr"
        with pytest.raises(RunFault) as info:
            run(out)
        line = str(info.value)
        assert "\n" not in line and str(source) in line and "--resume" in line, line
        assert "traceback in " in line
        chunk.write_bytes(intact)
        run(out, resume=True)
    assert_same_outputs(out, tmp_path / "ref.zarr")


def test_corrupt_chunk_met_by_the_normalization_names_its_box(tmp_path, batchnorm_unet):
    source = zstd_volume(tmp_path / "v.zarr")
    (source / "c" / "2" / "1" / "0").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(range(64)))
    config = CONFIG.replace(normalize="percentile:1,99")
    with pytest.raises(InputReadError) as info:
        list(run_check(open_volume(source), batchnorm_unet, config, tmp_path / "o.zarr"))
    line = str(info.value)
    assert line.startswith(f"cannot read the input {source} in the box z 16:24, y 16:32, x 0:16")
    assert "normalization" in line and not (tmp_path / "o.zarr").exists()


def test_memory_running_out_mid_run_is_one_line_that_names_where_and_the_fix(tmp_path):
    """The host's (NumPy's MemoryError, torch's allocator error) and a GPU's out-of-memory error
    that reach the run's end (the forwards halve their batch themselves) say what ran out and
    which setting to lower, with the traceback in the log."""
    import torch

    from napari_normcheck.core.base.errors import RunFault
    from napari_normcheck.core.run.faults import run_fault

    errors = []
    for allocate in (
        lambda: np.empty(2**62, dtype=np.uint8),
        lambda: torch.empty(2**62, dtype=torch.uint8),
    ):
        with pytest.raises(Exception) as info:
            allocate()
        errors.append(info.value)
    # What torch raises when a GPU allocation fails (no GPU here to exhaust).
    errors.append(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    out = tmp_path / "o.zarr"
    lines = [str(run_fault(e, out=out, store_path=out)) for e in errors]
    for error, line in zip(errors, lines):
        assert isinstance(run_fault(error, out=out, store_path=out), RunFault)
        assert "\n" not in line and "traceback in " in line, line
        assert "--resume" in line and "--overwrite" in line, line
    assert lines[0].startswith("the computer ran out of memory") and "--cache-mb" in lines[0]
    assert lines[1].startswith("the computer ran out of memory"), lines[1]
    assert lines[2].startswith("the GPU ran out of memory") and "--eval-batch" in lines[2]
    once = run_fault(errors[2], out=out, store_path=out, resumable=False)
    assert "--resume" not in str(once)
