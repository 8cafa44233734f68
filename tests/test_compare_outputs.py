"""scripts/compare_outputs.py: two runs' outputs compared bit for bit."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import zarr

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.io.volume import open_volume
from napari_normcheck.core.run.engine import run_check
from napari_normcheck.core.run.events import RunFinished
from tests.conftest import synthetic_volume

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_outputs.py"


def _compare():
    spec = importlib.util.spec_from_file_location("compare_outputs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _run(tmp_path, name, model):
    volume = open_volume(synthetic_volume((16, 40, 44)))
    events = list(run_check(volume, model, RunConfig(tile=(16, 32, 32)), tmp_path / f"{name}.zarr"))
    assert isinstance(events[-1], RunFinished)
    (tmp_path / f"{name}.json").write_text(json.dumps(events[-1].summary, default=str))
    return str(tmp_path / f"{name}.zarr"), str(tmp_path / f"{name}.json")


def test_equal_runs_pass_and_a_changed_voxel_or_number_is_named(tmp_path, batchnorm_unet, capsys):
    compare = _compare()
    a, report_a = _run(tmp_path, "a", batchnorm_unet)
    b, report_b = _run(tmp_path, "b", batchnorm_unet)
    assert compare([a, b, "--reports", report_a, report_b]) == 0
    assert "equal bit for bit" in capsys.readouterr().out

    disparity = zarr.open_array(f"{b}/disparity/0", mode="r+")
    values = disparity[...]
    values.flat[7] = values.flat[7] + 1 if values.flat[7] < 255 else 0
    disparity[...] = values
    summary = json.loads(Path(report_b).read_text())
    summary["disparity"]["soft"][0] = np.nextafter(summary["disparity"]["soft"][0], 1.0)
    Path(report_b).write_text(json.dumps(summary))
    assert compare([a, b, "--reports", report_a, report_b]) == 1
    printed = capsys.readouterr().out
    assert (
        "disparity/0: differs, largest difference 1" in printed or "disparity/0: differs" in printed
    )
    assert "report disparity: differs" in printed and "2 differ" in printed
