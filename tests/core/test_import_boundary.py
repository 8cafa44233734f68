"""The compute core imports without Qt or napari; the package itself imports neither Qt nor torch;
the tile loop imports nothing of the distributed path."""

import json
import pkgutil
import subprocess
import sys

import napari_normcheck.core

FORBIDDEN_IN_CORE = (
    "napari",
    "qtpy",
    "magicgui",
    "superqt",
    "PyQt5",
    "PyQt6",
    "PySide2",
    "PySide6",
    "pyqtgraph",
    "matplotlib",
)


CLUSTER_MODULES = {
    f"napari_normcheck.core.run.{name}"
    for name in ("blocks", "blocktask", "distributed", "manifest")
}


def modules_after(code: str) -> set[str]:
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    output = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    return set(json.loads(output.stdout.splitlines()[-1]))


def loaded_after(code: str) -> set[str]:
    return {name.split(".")[0] for name in modules_after(code)}


def test_every_core_module_imports_without_qt_or_napari():
    modules = [
        m.name
        for m in pkgutil.walk_packages(napari_normcheck.core.__path__, "napari_normcheck.core.")
    ]
    assert {
        "napari_normcheck.core.run.engine",
        "napari_normcheck.core.base.tiling",
        "napari_normcheck.core.run.stitch",
        "napari_normcheck.core.io.volume",
        "napari_normcheck.core.models.models",
        "napari_normcheck.core.measure.metrics",
    } <= set(modules)
    imports = "\n".join(f"import {name}" for name in modules)
    assert not loaded_after(imports) & set(FORBIDDEN_IN_CORE)


def test_package_import_is_light():
    assert not loaded_after("import napari_normcheck") & {"torch", "napari", "PyQt6", "qtpy"}


def test_tile_loop_and_engine_load_nothing_of_the_cluster():
    loaded = modules_after(
        "import napari_normcheck.core.run.engine, napari_normcheck.core.run.tileloop"
    )
    assert "napari_normcheck.core.run.tileloop" in loaded
    assert not loaded & CLUSTER_MODULES
    # The cluster path, in turn, builds on the loop.
    assert "napari_normcheck.core.run.tileloop" in modules_after(
        "import napari_normcheck.core.run.distributed"
    )


def test_a_single_process_run_imports_no_dask_distributed(tmp_path):
    """dask imports dask.distributed (0.1 s of start-up) for a compute without a scheduler
    function: reading tiles and sampling the normalization name theirs."""
    code = f"""
import numpy as np, torch, zarr
from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.io.volume import open_volume
from napari_normcheck.core.run.engine import run_check
root = {str(tmp_path)!r}
data = zarr.open_array(root + "/v.zarr", mode="w", shape=(8, 64, 64), chunks=(8, 32, 32),
                       dtype="uint8")
data[:] = np.random.default_rng(0).integers(0, 255, (8, 64, 64), dtype=np.uint8)
model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1), torch.nn.BatchNorm3d(2)).eval()
config = RunConfig(tile=(8, 32, 32), normalize="percentile:1,99")
events = list(run_check(open_volume(root + "/v.zarr"), model, config, root + "/o.zarr"))
assert type(events[-1]).__name__ == "RunFinished"
"""
    assert "distributed" not in loaded_after(code)
