"""``run --grid-shift`` on real ssTEM with the packaged sample networks equals MONAI by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_normcheck._reader import layers_from_store
from napari_normcheck.cli import main
from napari_normcheck.data import SAMPLE_MODELS
from tests.conftest import ISBI_RAW
from tests.core.test_grid_shift import monai_predictions, one_minus_dice

TILE = (16, 64, 64)


@pytest.mark.skipif(not ISBI_RAW.exists(), reason="shared ISBI 2012 data not present")
@pytest.mark.parametrize("name", ["groupnorm", "batchnorm"])
def test_run_grid_shift_on_real_em_equals_monai(tmp_path, capsys, name):
    import tifffile

    raw = tifffile.imread(ISBI_RAW)[:20, 100:196, 200:296]  # 20 x 96 x 96 ssTEM
    np.save(tmp_path / "em.npy", raw)
    sample = SAMPLE_MODELS[name]
    args = [
        "run",
        str(tmp_path / "em.npy"),
        "--model",
        str(sample.path),
        "--arch",
        sample.arch,
        "--arch-kwargs",
        json.dumps(sample.arch_kwargs),
        "--out",
        str(tmp_path / "out.zarr"),
        "--tile",
        ",".join(map(str, TILE)),
        "--normalize",
        "minmax:0,255",
        "--activation",
        "sigmoid",
        "--device",
        "cpu",
        "--grid-shift",  # F = 0.5
        "--report",
        str(tmp_path / "report.json"),
    ]
    assert main(args) == 0
    assert "grid shift eval" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    offset = report["grid_shift_offset"]
    assert offset == [6, 24, 24]  # half of MONAI's step int(tile * 0.75) per tiled axis

    model = sample.load()
    image = raw.astype(np.float32) / 255.0
    sz, sy, sx = offset
    main_grid = monai_predictions(image, model, TILE, 0.25)
    shifted = monai_predictions(image[sz:, sy:, sx:], model, TILE, 0.25)
    for mode in ("eval", "train"):
        hard, soft = one_minus_dice(main_grid[mode][:, sz:, sy:, sx:], shifted[mode])
        np.testing.assert_allclose(report["grid_shift"][mode]["hard"], hard, atol=2e-3)
        np.testing.assert_allclose(report["grid_shift"][mode]["soft"], soft, atol=1e-4)
    # napari's reader opens the maps of both grids' difference.
    names = [kwargs["name"] for _, kwargs, _ in layers_from_store(tmp_path / "out.zarr")]
    assert {"shift diff (eval)", "shift diff (train)"} <= set(names)
    values = {m: report["grid_shift"][m]["soft"][0] for m in ("eval", "train")}
    if name == "batchnorm":  # running statistics keep the eval result more in place
        assert values["train"] > values["eval"]
    else:  # GroupNorm normalizes each tile by itself in both modes
        assert values["eval"] > 0.01
