"""Build bioimage.io test packages with bioimageio.spec's own description classes (0.4 and 0.5).

Optional fields stay at their defaults (a second space axis without ``id`` is ``x`` in 0.5).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import torch

NET_SOURCE = """
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, in_channels: int = 1, features: int = 4, dims: int = 3):
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        norm = nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d
        self.conv = conv(in_channels, features, 3, padding=1)
        self.norm = norm(features)
        self.head = conv(features, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))))
"""

P_LOW, P_HIGH = 1.0, 99.8


def import_net(folder: Path):
    spec = importlib.util.spec_from_file_location(f"_test_net_{folder.name}", folder / "net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TinyNet


def expected_output(net: torch.nn.Module, raw: np.ndarray) -> np.ndarray:
    """Independent computation: bioimage.io scale_range, eval-mode forward, sigmoid."""
    low, high = np.percentile(raw.astype(np.float32), [P_LOW, P_HIGH])
    image = (raw.astype(np.float32) - np.float32(low)) / np.float32(high - low + 1e-6)
    net.eval()
    with torch.no_grad():
        logits = net(torch.from_numpy(image.astype(np.float32)))
    return torch.sigmoid(logits).numpy()


def _sources(folder: Path, dims: int, traced: bool, shape: tuple[int, ...]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "net.py").write_text(NET_SOURCE)
    (folder / "README.md").write_text("# A tiny test network\n")
    torch.manual_seed(0)
    net = import_net(folder)(in_channels=1, features=4, dims=dims)
    with torch.no_grad():
        net.norm.running_mean.uniform_(-0.5, 0.5)
        net.norm.running_var.uniform_(0.5, 2.0)
    torch.save(net.state_dict(), folder / "weights.pt")
    example = torch.zeros(1, 1, *shape)
    exported = torch.jit.trace(net.eval(), example) if traced else torch.jit.script(net.eval())
    torch.jit.save(exported, str(folder / "weights_ts.pt"))
    raw = np.random.default_rng(0).integers(0, 255, (1, 1, *shape)).astype(np.uint16)
    np.save(folder / "test_input.npy", raw)
    np.save(folder / "test_output.npy", expected_output(net, raw))


def make_package(
    folder: Path,
    *,
    weights: tuple[str, ...] = ("torchscript", "pytorch_state_dict"),
    v05: bool = True,
    traced: bool = False,
    dims: int = 3,
    fixed: bool = False,
    halo: int = 0,
) -> Path:
    """Write a package with a tiny Conv + BatchNorm network into ``folder`` and return it.

    Inputs take ``min 8 + n * 8`` per spatial axis (``fixed``: exactly the test shape); the
    channels are named ``raw`` / ``prob`` (0.5 only).
    """
    shape = (8, 16, 16)[3 - dims :]
    source = folder.with_name(folder.name + "_src")
    _sources(source, dims, traced, shape)
    descr = (_describe_05 if v05 else _describe_04)(source, weights, dims, fixed, halo, shape)
    from bioimageio.spec import save_bioimageio_package_as_folder

    save_bioimageio_package_as_folder(descr, output_path=folder)
    if not (folder / "net.py").exists():  # 0.4's packaging leaves the architecture file out
        (folder / "net.py").write_text(NET_SOURCE)
    return folder


def _describe_05(source, weights, dims, fixed, halo, shape):
    from bioimageio.spec import ValidationContext
    from bioimageio.spec.model import v0_5 as m

    with ValidationContext(root=source, perform_io_checks=False):
        # The last space axis has no id: the format's default, x.
        space_in = [
            m.SpaceInputAxis(
                id=m.AxisId(a), size=s if fixed else m.ParameterizedSize(min=8, step=8)
            )
            for a, s in zip("zy"[3 - dims :], shape)
        ] + [m.SpaceInputAxis(size=shape[-1] if fixed else m.ParameterizedSize(min=8, step=8))]
        space_out = [
            m.SpaceOutputAxisWithHalo(
                id=axis.id,
                halo=halo,
                size=m.SizeReference(tensor_id=m.TensorId("raw"), axis_id=axis.id),
            )
            if halo
            else m.SpaceOutputAxis(
                id=axis.id, size=m.SizeReference(tensor_id=m.TensorId("raw"), axis_id=axis.id)
            )
            for axis in space_in
        ]
        pre = m.ScaleRangeDescr(
            kwargs=m.ScaleRangeKwargs(
                axes=[axis.id for axis in space_in], min_percentile=P_LOW, max_percentile=P_HIGH
            )
        )
        inputs = m.InputTensorDescr(
            id=m.TensorId("raw"),
            axes=[m.BatchAxis(), m.ChannelAxis(channel_names=[m.Identifier("raw")]), *space_in],
            test_tensor=m.FileDescr(source=Path("test_input.npy")),
            preprocessing=[pre],
        )
        outputs = m.OutputTensorDescr(
            id=m.TensorId("prob"),
            axes=[m.BatchAxis(), m.ChannelAxis(channel_names=[m.Identifier("prob")]), *space_out],
            test_tensor=m.FileDescr(source=Path("test_output.npy")),
            postprocessing=[m.SigmoidDescr()],
        )
        entries = {}
        if "pytorch_state_dict" in weights:
            arch = m.ArchitectureFromFileDescr(
                source=Path("net.py"),
                callable=m.Identifier("TinyNet"),
                kwargs={"features": 4, "dims": dims},
            )
            entries["pytorch_state_dict"] = m.PytorchStateDictWeightsDescr(
                source=Path("weights.pt"), architecture=arch, pytorch_version="2.1"
            )
        if "torchscript" in weights:
            entries["torchscript"] = m.TorchscriptWeightsDescr(
                source=Path("weights_ts.pt"), pytorch_version="2.1"
            )
        return m.ModelDescr(
            name="tiny test net",
            description="a tiny Conv + BatchNorm network for tests",
            authors=[m.Author(name="napari-normcheck")],
            cite=[m.CiteEntry(text="napari-normcheck", doi=m.Doi("10.1234/normcheck"))],
            license="MIT",
            inputs=[inputs],
            outputs=[outputs],
            weights=m.WeightsDescr(**entries),
        )


def _describe_04(source, weights, dims, fixed, halo, shape):
    from bioimageio.spec import ValidationContext
    from bioimageio.spec.model import v0_4 as m

    axes = "bc" + "zyx"[3 - dims :]
    with ValidationContext(root=source, perform_io_checks=False):
        if fixed:
            shape_in = [1, 1, *shape]
        else:
            shape_in = m.ParameterizedInputShape(min=[1, 1] + [8] * dims, step=[0, 0] + [8] * dims)
        pre = m.ScaleRangeDescr(
            kwargs=m.ScaleRangeKwargs(
                mode="per_sample", axes=axes[2:], min_percentile=P_LOW, max_percentile=P_HIGH
            )
        )
        inputs = m.InputTensorDescr(
            name="raw", axes=axes, data_type="float32", shape=shape_in, preprocessing=[pre]
        )
        outputs = m.OutputTensorDescr(
            name="prob",
            axes=axes,
            data_type="float32",
            shape=m.ImplicitOutputShape(
                reference_tensor="raw", scale=[1.0] * len(axes), offset=[0] * len(axes)
            ),
            halo=[0, 0] + [halo] * dims if halo else None,
            postprocessing=[m.SigmoidDescr()],
        )
        entries = {}
        if "pytorch_state_dict" in weights:
            entries["pytorch_state_dict"] = m.PytorchStateDictWeightsDescr(
                source=Path("weights.pt"),
                architecture="net.py:TinyNet",
                architecture_sha256=hashlib.sha256((source / "net.py").read_bytes()).hexdigest(),
                kwargs={"features": 4, "dims": dims},
            )
        if "torchscript" in weights:
            entries["torchscript"] = m.TorchscriptWeightsDescr(source=Path("weights_ts.pt"))
        return m.ModelDescr(
            name="tiny test net",
            description="a tiny Conv + BatchNorm network for tests",
            authors=[m.Author(name="napari-normcheck")],
            cite=[m.CiteEntry(text="napari-normcheck", doi="10.1234/normcheck")],
            license="MIT",
            documentation=Path("README.md"),
            test_inputs=[Path("test_input.npy")],
            test_outputs=[Path("test_output.npy")],
            inputs=[inputs],
            outputs=[outputs],
            weights=m.WeightsDescr(**entries),
            timestamp="2024-01-01T00:00:00",
        )


LIBRARY_KWARGS = {
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 2,
    "features": [4, 4, 8, 8, 16, 4],
    "norm": "batch",
}


def make_library_package(folder: Path) -> Path:
    """A 0.5 package whose state_dict's architecture is MONAI's BasicUNet (no package code)."""
    from bioimageio.spec import ValidationContext, save_bioimageio_package_as_folder
    from bioimageio.spec.model import v0_5 as m
    from monai.networks.nets import BasicUNet

    source = folder.with_name(folder.name + "_src")
    source.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = BasicUNet(**LIBRARY_KWARGS).eval()
    torch.save(net.state_dict(), source / "weights.pt")
    image = np.random.default_rng(0).normal(size=(1, 1, 32, 48)).astype(np.float32)
    np.save(source / "test_input.npy", image)
    with torch.no_grad():
        np.save(source / "test_output.npy", net(torch.from_numpy(image)).numpy())
    with ValidationContext(root=source, perform_io_checks=False):
        space = [
            m.SpaceInputAxis(id=m.AxisId(a), size=m.ParameterizedSize(min=16, step=16))
            for a in "yx"
        ]
        inputs = m.InputTensorDescr(
            id=m.TensorId("raw"),
            axes=[m.BatchAxis(), m.ChannelAxis(channel_names=[m.Identifier("raw")]), *space],
            test_tensor=m.FileDescr(source=Path("test_input.npy")),
        )
        outputs = m.OutputTensorDescr(
            id=m.TensorId("logits"),
            axes=[
                m.BatchAxis(),
                m.ChannelAxis(channel_names=[m.Identifier("background"), m.Identifier("cells")]),
                *[
                    m.SpaceOutputAxis(
                        id=a.id, size=m.SizeReference(tensor_id=m.TensorId("raw"), axis_id=a.id)
                    )
                    for a in space
                ],
            ],
            test_tensor=m.FileDescr(source=Path("test_output.npy")),
        )
        arch = m.ArchitectureFromLibraryDescr(
            import_from="monai.networks.nets",
            callable=m.Identifier("BasicUNet"),
            kwargs=LIBRARY_KWARGS,
        )
        descr = m.ModelDescr(
            name="tiny basic unet",
            description="MONAI BasicUNet from its library",
            authors=[m.Author(name="napari-normcheck")],
            cite=[m.CiteEntry(text="napari-normcheck", doi=m.Doi("10.1234/normcheck"))],
            license="MIT",
            inputs=[inputs],
            outputs=[outputs],
            weights=m.WeightsDescr(
                pytorch_state_dict=m.PytorchStateDictWeightsDescr(
                    source=Path("weights.pt"), architecture=arch, pytorch_version="2.1"
                )
            ),
        )
    save_bioimageio_package_as_folder(descr, output_path=folder)
    return folder
