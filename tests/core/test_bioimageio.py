"""bioimage.io packages: loading offline, trust, processing mapping, --verify and zip safety."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from napari_normcheck.cli import main
from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.models import bioimageio, package_zip
from napari_normcheck.core.models.models import load_model
from tests.core.bioimageio_packages import make_package

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.:DeprecationWarning")


def zip_folder(folder: Path, zip_path: Path) -> Path:
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(folder.iterdir()):
            archive.write(file, file.name)
    return zip_path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Extract zips under tmp_path rather than the shared temp folder."""
    monkeypatch.setattr(package_zip, "cache_root", lambda: tmp_path / "cache")
    return tmp_path / "cache"


def test_torchscript_package_loads_as_folder_without_trust(tmp_path):
    package = make_package(tmp_path / "pkg")
    loaded = load_model(package)
    assert loaded.format == "bioimageio"
    assert loaded.path == str(package)
    assert isinstance(loaded.module, torch.jit.ScriptModule)
    assert loaded.switchable
    assert (loaded.info.spatial_dims, loaded.info.in_channels, loaded.info.out_channels) == (
        3,
        1,
        1,
    )
    assert loaded.preprocessing["normalize"] == "percentile:1,99.8"
    steps = [step["name"] for step in loaded.preprocessing["raw"]]
    assert [name for name in steps if name != "ensure_dtype"] == ["scale_range"]
    assert loaded.postprocessing["activation"] == "sigmoid"


def test_package_loads_as_zip(tmp_path, cache):
    package = zip_folder(make_package(tmp_path / "pkg"), tmp_path / "pkg.zip")
    loaded = load_model(package)
    assert loaded.format == "bioimageio"
    assert loaded.path == str(package)
    assert len(list(cache.iterdir())) == 1
    # A second load reuses the extracted folder.
    assert load_model(package).info == loaded.info
    assert len(list(cache.iterdir())) == 1


def test_state_dict_source_needs_trust(tmp_path):
    package = make_package(tmp_path / "pkg", weights=("pytorch_state_dict",))
    with pytest.raises(NormcheckError, match="--trust-pickle") as caught:
        load_model(package)
    assert "net.py" in str(caught.value)
    loaded = load_model(package, trust_pickle=True)
    assert not isinstance(loaded.module, torch.jit.ScriptModule)
    assert loaded.arch.endswith("net.py:TinyNet")
    assert loaded.arch_kwargs == {"features": 4, "dims": 3}
    assert type(loaded.module.norm) is torch.nn.BatchNorm3d


def test_format_04_state_dict(tmp_path):
    package = make_package(tmp_path / "pkg", weights=("pytorch_state_dict",), v05=False)
    loaded = load_model(package, trust_pickle=True)
    assert loaded.info.in_channels == 1
    assert loaded.preprocessing["normalize"] == "percentile:1,99.8"
    assert main(["inspect", str(package), "--trust-pickle", "--verify"]) == 0


@pytest.mark.parametrize(
    ("step", "spec"),
    [
        ({"name": "scale_linear", "kwargs": {"gain": 2.0, "offset": -1.0}}, "meanstd:0.5,0.5"),
        (
            {"name": "zero_mean_unit_variance", "kwargs": {"mode": "fixed", "mean": 3, "std": 2}},
            "meanstd:3.0,2.0",
        ),
        (
            {"name": "fixed_zero_mean_unit_variance", "kwargs": {"mean": 3, "std": 2}},
            "meanstd:3.0,2.0",
        ),
        ({"name": "zero_mean_unit_variance", "kwargs": {"mode": "per_dataset"}}, "zscore"),
        (
            {"name": "scale_range", "kwargs": {"mode": "per_sample", "max_percentile": 99}},
            "percentile:0,99",
        ),
    ],
)
def test_preprocessing_mapping(step, spec):
    mapped, notes = bioimageio.map_preprocessing([step])
    assert mapped == spec
    if spec is None:
        assert any("meanstd:MEAN,STD" in note for note in notes)


def test_scale_linear_mapping_matches_the_formula():
    from napari_normcheck.core.io.intensity import resolve_intensity

    step = {"name": "scale_linear", "kwargs": {"gain": 0.25, "offset": 3.0}}
    spec, _ = bioimageio.map_preprocessing([step])
    data = np.linspace(-10, 10, 50, dtype=np.float32)
    mapped = resolve_intensity(spec, data).apply(data)
    np.testing.assert_allclose(mapped, bioimageio.apply_preprocessing([step], data), atol=1e-5)


def test_postprocessing_mapping():
    activation, notes = bioimageio.map_postprocessing(
        [{"name": "sigmoid", "kwargs": {}}, {"name": "binarize", "kwargs": {"threshold": 0.5}}]
    )
    assert activation == "sigmoid"
    assert any("binarize" in note for note in notes)


def test_verify_passes_and_fails_on_tampered_output(tmp_path, cache, capsys):
    package = make_package(tmp_path / "pkg")
    assert main(["inspect", str(package), "--verify"]) == 0
    assert "max abs difference" in capsys.readouterr().out
    assert main(["inspect", str(zip_folder(package, tmp_path / "pkg.zip")), "--verify"]) == 0
    expected = np.load(package / "test_output.npy")
    expected[0, 0, 0, 0, 0] += 0.01
    np.save(package / "test_output.npy", expected)
    assert main(["inspect", str(package), "--verify"]) == 1
    assert "NOT reproduced" in capsys.readouterr().out


def test_verify_result_is_independent_of_train_mode(tmp_path):
    package = make_package(tmp_path / "pkg", weights=("pytorch_state_dict",))
    loaded = load_model(package, trust_pickle=True)
    loaded.module.train()
    result = bioimageio.verify_package(package, loaded=loaded)
    assert result.passed and result.max_abs_diff < 1e-5
    assert loaded.module.training  # the mode was restored


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "a/../../evil.txt", "C:/x.txt"])
def test_zip_slip_refused(tmp_path, cache, name):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("rdf.yaml", "type: model\n")
        archive.writestr(name, "pwned")
    with pytest.raises(NormcheckError, match="unsafe path"):
        load_model(bad)
    assert not (tmp_path / "evil.txt").exists()
    assert not cache.exists() or not any(cache.iterdir())


def test_zip_bomb_ratio_refused(tmp_path, cache):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("rdf.yaml", "type: model\n")
        archive.writestr("zeros.npy", bytes(8 * 1024**2))
    with pytest.raises(NormcheckError, match="zip bomb"):
        load_model(bomb)


def test_zip_bomb_total_size_refused(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(package_zip, "MAX_UNPACKED_BYTES", 1000)
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("rdf.yaml", "type: model\n")
        archive.writestr("blob.bin", np.random.default_rng(0).bytes(2000))
    with pytest.raises(NormcheckError, match="zip bomb"):
        load_model(big)


def test_weights_sha256_mismatch_and_url_refused(tmp_path):
    package = make_package(tmp_path / "pkg", weights=("torchscript",))
    rdf = yaml.safe_load((package / "rdf.yaml").read_text())
    rdf["weights"]["torchscript"]["sha256"] = "0" * 64
    (package / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    with pytest.raises(NormcheckError, match="sha256"):
        load_model(package)
    rdf["weights"]["torchscript"]["source"] = "https://example.org/weights.pt"
    rdf["weights"]["torchscript"].pop("sha256")
    (package / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    with pytest.raises(NormcheckError, match="offline"):
        load_model(package)


def test_verify_needs_a_package(tmp_path, capsys):
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 1, 3, padding=1))
    torch.jit.save(torch.jit.script(net), str(tmp_path / "model.pt"))
    assert main(["inspect", str(tmp_path / "model.pt"), "--verify"]) == 2
    assert "bioimage.io package" in capsys.readouterr().err


def test_folder_without_rdf_is_an_error(tmp_path):
    with pytest.raises(NormcheckError, match="rdf.yaml"):
        load_model(tmp_path)


def test_traced_torchscript_falls_back_to_trusted_state_dict(tmp_path):
    package = make_package(tmp_path / "pkg", traced=True)
    untrusted = load_model(package)
    assert not untrusted.switchable
    assert any("--trust-pickle" in note for note in untrusted.notes)
    trusted = load_model(package, trust_pickle=True)
    assert trusted.switchable
    assert type(trusted.module.norm) is torch.nn.BatchNorm3d


def test_verify_uses_the_package_tolerance(tmp_path):
    package = make_package(tmp_path / "pkg")
    expected = np.load(package / "test_output.npy")
    np.save(package / "test_output.npy", expected + 0.01)
    assert not bioimageio.verify_package(package).passed
    rdf = yaml.safe_load((package / "rdf.yaml").read_text())
    rdf["config"] = {"bioimageio": {"reproducibility_tolerance": [{"absolute_tolerance": 0.02}]}}
    (package / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    result = bioimageio.verify_package(package)
    assert result.passed
    assert result.atol == 0.02
    assert abs(result.max_abs_diff - 0.01) < 1e-4


def test_run_with_a_package_needs_no_arch_normalize_or_activation(tmp_path):
    import zarr

    from napari_normcheck.cli import main

    package = make_package(tmp_path / "pkg")
    raw = np.random.default_rng(1).integers(0, 255, (8, 32, 32)).astype(np.uint16)
    np.save(tmp_path / "v.npy", raw)
    out = tmp_path / "o.zarr"
    assert (
        main(
            [
                "run",
                str(tmp_path / "v.npy"),
                "--model",
                str(package),
                "--out",
                str(out),
                "--tile",
                "8,16,16",
            ]
        )
        == 0
    )
    params = zarr.open_group(str(out), mode="r").attrs["normcheck"]["params"]
    assert params["normalize"] == "percentile:1,99.8"
    assert params["activation"] == "sigmoid"
    pred = zarr.open_group(str(out), mode="r")["pred_eval/0"][:]
    prob = pred / 255.0 if pred.dtype == np.uint8 else pred
    assert prob.min() >= 0 and prob.max() <= 1 and 0.2 < prob.mean() < 0.8  # sigmoid applied


def test_05_package_whose_last_space_axis_has_no_id(tmp_path, capsys):
    # The format's default id is x: a 2D package with axes batch, channel, y, (x).
    package = make_package(tmp_path / "pkg", dims=2)
    axes = yaml.safe_load((package / "rdf.yaml").read_text())["inputs"][0]["axes"]
    assert axes[2]["id"] == "y" and "id" not in axes[3]
    assert main(["inspect", str(package), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "2D" in out and "test output reproduced" in out
    assert "tile sides: y a multiple of 8, x a multiple of 8" in out
    assert "channels: input ['raw'], output ['prob']" in out


@pytest.mark.parametrize("v05", [True, False])
def test_declared_sizes_halo_and_channel_names(tmp_path, v05):
    package = make_package(tmp_path / "pkg", v05=v05, halo=2)
    loaded = load_model(package)
    assert loaded.info.divisor == (8, 8, 8)  # the declared step, confirmed by forwards
    assert loaded.halo == (2, 2, 2)
    assert any("--halo 2,2,2" in note for note in loaded.notes)
    names = (["raw"], ["prob"]) if v05 else (None, None)
    assert (loaded.input_channel_names, loaded.output_channel_names) == names
    assert bioimageio.verify_package(package, loaded=loaded).passed


@pytest.mark.parametrize("v05", [True, False])
def test_fixed_size_package_gets_its_shape_as_tile(tmp_path, v05):
    import zarr

    package = make_package(tmp_path / "pkg", v05=v05, fixed=True, weights=("torchscript",))
    assert load_model(package).info.fixed_shape == (8, 16, 16)
    np.save(tmp_path / "v.npy", np.random.default_rng(1).normal(size=(8, 20, 20)))
    out = tmp_path / "o.zarr"
    assert main(["run", str(tmp_path / "v.npy"), "--model", str(package), "--out", str(out)]) == 0
    assert zarr.open_group(str(out), mode="r").attrs["normcheck"]["params"]["tile"] == [8, 16, 16]


def test_state_dict_of_an_installed_library_needs_no_trust(tmp_path, capsys):
    from tests.core.bioimageio_packages import make_library_package

    package = make_library_package(tmp_path / "pkg")
    loaded = load_model(package)
    assert loaded.arch == "monai.networks.nets:BasicUNet"
    assert loaded.info.divisor == (16, 16)
    assert loaded.output_channel_names == ["background", "cells"]
    assert main(["inspect", str(package), "--verify"]) == 0
    assert "test output reproduced" in capsys.readouterr().out
