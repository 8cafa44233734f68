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
from napari_normcheck.core.run.events import RunFinished, TileDone
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
