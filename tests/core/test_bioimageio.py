"""bioimage.io packages: loading offline, trust, processing mapping, --verify and zip safety."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from napari_normcheck.cli import main
from napari_normcheck.core import bioimageio, package_zip
from napari_normcheck.core.errors import NormcheckError
from napari_normcheck.core.models import load_model

NET_SOURCE = """
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, in_channels: int = 1, features: int = 4):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, features, 3, padding=1)
        self.norm = nn.BatchNorm3d(features)
        self.head = nn.Conv3d(features, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))))
"""

P_LOW, P_HIGH = 1.0, 99.8
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.:DeprecationWarning")


def _import_net(folder: Path):
    spec = importlib.util.spec_from_file_location(f"_test_net_{folder.name}", folder / "net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TinyNet


def _expected_output(net: torch.nn.Module, raw: np.ndarray) -> np.ndarray:
    """Independent computation: bioimage.io scale_range, eval-mode forward, sigmoid."""
    low, high = np.percentile(raw.astype(np.float32), [P_LOW, P_HIGH])
    image = (raw.astype(np.float32) - np.float32(low)) / np.float32(high - low + 1e-6)
    net.eval()
    with torch.no_grad():
        logits = net(torch.from_numpy(image.astype(np.float32)))
    return torch.sigmoid(logits).numpy()


def make_package(
    folder: Path,
    *,
    weights: tuple[str, ...] = ("torchscript", "pytorch_state_dict"),
    v05: bool = True,
    traced: bool = False,
) -> Path:
    """Write a package with a tiny Conv3d + BatchNorm3d network into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "net.py").write_text(NET_SOURCE)
    torch.manual_seed(0)
    net = _import_net(folder)(in_channels=1, features=4)
    with torch.no_grad():
        net.norm.running_mean.uniform_(-0.5, 0.5)
        net.norm.running_var.uniform_(0.5, 2.0)
    torch.save(net.state_dict(), folder / "weights.pt")
    example = torch.zeros(1, 1, 8, 16, 16)
    exported = torch.jit.trace(net.eval(), example) if traced else torch.jit.script(net.eval())
    torch.jit.save(exported, str(folder / "weights_ts.pt"))
    raw = np.random.default_rng(0).integers(0, 255, (1, 1, 8, 16, 16)).astype(np.uint16)
    np.save(folder / "test_input.npy", raw)
    np.save(folder / "test_output.npy", _expected_output(net, raw))
    pre = {"kwargs": {"min_percentile": P_LOW, "max_percentile": P_HIGH, "axes": "zyx"}}
    if v05:
        space = [{"type": "space", "id": a, "size": 16} for a in "zyx"]
        axes_in = [{"type": "batch"}, {"type": "channel", "channel_names": ["raw"]}, *space]
        rdf = {
            "format_version": "0.5.4",
            "type": "model",
            "inputs": [
                {
                    "id": "raw",
                    "axes": axes_in,
                    "test_tensor": {"source": "test_input.npy"},
                    "preprocessing": [{"id": "scale_range", **pre}],
                }
            ],
            "outputs": [
                {
                    "id": "prob",
                    "axes": axes_in,
                    "test_tensor": {"source": "test_output.npy"},
                    "postprocessing": [{"id": "sigmoid"}],
                }
            ],
            "weights": {},
        }
        arch = {"source": "net.py", "callable": "TinyNet", "kwargs": {"features": 4}}
        state_dict = {"source": "weights.pt", "architecture": arch}
    else:
        rdf = {
            "format_version": "0.4.10",
            "type": "model",
            "test_inputs": ["test_input.npy"],
            "test_outputs": ["test_output.npy"],
            "inputs": [
                {
                    "name": "raw",
                    "axes": "bczyx",
                    "shape": [1, 1, 8, 16, 16],
                    "preprocessing": [{"name": "scale_range", **pre}],
                }
            ],
            "outputs": [{"name": "prob", "axes": "bczyx", "postprocessing": [{"name": "sigmoid"}]}],
            "weights": {},
        }
        state_dict = {"source": "weights.pt", "architecture": "net.py:TinyNet", "kwargs": {}}
    if "torchscript" in weights:
        rdf["weights"]["torchscript"] = {"source": "weights_ts.pt"}
    if "pytorch_state_dict" in weights:
        rdf["weights"]["pytorch_state_dict"] = state_dict
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    return folder


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
    assert loaded.preprocessing["raw"][0]["name"] == "scale_range"
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
    assert loaded.arch_kwargs == {"features": 4}
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
    from napari_normcheck.core.intensity import resolve_intensity

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
    rdf["weights"]["torchscript"] = {"source": "https://example.org/weights.pt"}
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
    assert pred.min() >= 0 and pred.max() <= 1  # sigmoid applied
