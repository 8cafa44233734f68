"""Predictions stay on the run's device: the blend there, one copy of finished results to the host."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_normcheck.core.base.tiling import plan_tiles
from napari_normcheck.core.run.staging import HostCopies
from napari_normcheck.core.run.stitch import ChunkAccumulator, importance_map

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_host_copies_on_the_cpu_hand_the_tensors_memory_over():
    tensor = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    host = HostCopies(torch.device("cpu")).to_host(tensor)
    assert isinstance(host, np.ndarray) and host.shape == (2, 3, 4)
    tensor[0, 0, 0] = -1.0  # no copy was made
    assert host[0, 0, 0] == -1.0


def _blend(plan, predictions, device, tmp_path):
    out = {}
    accumulator = ChunkAccumulator(
        plan,
        2,
        importance_map(plan.window_shape, "gaussian"),
        lambda chunk, _slices, values: out.update({chunk: values.cpu().numpy()}),
        tmp_path,
        max_bytes=3 * 2 * 4 * int(np.prod(plan.chunk_shape)),
        device=device,
    )
    for tile in plan.tiles():
        accumulator.add(tile, torch.from_numpy(predictions[tile.index]).to(device))
    assert accumulator.complete
    return out


@cuda
def test_blend_on_cuda_is_the_cpu_blend_bit_for_bit(tmp_path):
    plan = plan_tiles((30, 70, 61), (16, 32, 32), overlap=0.3)
    rng = np.random.default_rng(0)
    predictions = rng.normal(size=(plan.n_tiles, 2, *plan.window_shape)).astype(np.float32)
    on_cpu = _blend(plan, predictions, torch.device("cpu"), tmp_path / "cpu")
    on_gpu = _blend(plan, predictions, torch.device("cuda"), tmp_path / "cuda")
    assert on_cpu.keys() == on_gpu.keys()
    for chunk, values in on_cpu.items():
        np.testing.assert_array_equal(on_gpu[chunk], values)


@cuda
def test_host_copies_on_cuda_land_before_they_are_read():
    copies = HostCopies(torch.device("cuda"))
    for k in range(3):
        tensor = torch.full((2, 64, 64, 64), float(k), device="cuda").sigmoid_()
        expected = float(tensor[0, 0, 0, 0])
        host = copies.to_host(tensor)
        del tensor  # its memory may be reused at once: the copy has been waited for
        assert (host == expected).all()


@pytest.mark.parametrize("argmax", [False, True])
def test_dice_sums_with_torch_operations_are_numpys_bit_for_bit(argmax):
    """The GPU's Dice sums (run here on CPU tensors) equal the host's, every entry, every bit."""
    from napari_normcheck.core.measure.metrics import dice_sums, dice_sums_on_device
    from napari_normcheck.core.measure.rowsums import numpy_order_row_sums

    rng = np.random.default_rng(3)
    logits = rng.normal(0, 6, size=(2, 3, 20, 70, 61)).astype(np.float32)
    p_train, p_eval = 1 / (1 + np.exp(-logits))
    # A strided view, as a tile's written box is.
    view = (slice(None), slice(2, 18), slice(5, 66), slice(0, 59))
    expected = dice_sums(p_train[view], p_eval[view], 0.5, argmax=argmax, counts=True)
    got = dice_sums_on_device(
        torch.from_numpy(p_train)[view],
        torch.from_numpy(p_eval)[view],
        0.5,
        argmax=argmax,
        counts=True,
        row_sums=numpy_order_row_sums,
    )
    assert got.keys() == expected.keys()
    for kind, values in expected.items():
        assert got[kind].dtype == values.dtype
        np.testing.assert_array_equal(got[kind], values)


def _run(tmp_path, name, model, activation):
    import zarr

    from napari_normcheck.core.base.config import RunConfig
    from napari_normcheck.core.io.volume import open_volume
    from napari_normcheck.core.run.engine import run_check
    from napari_normcheck.core.run.events import RunFinished
    from tests.conftest import synthetic_volume

    config = RunConfig(
        # Tiles of 65536 voxels: sums that long differ in their last bits between orders.
        tile=(16, 64, 64),
        overlap=0.25,
        activation=activation,
        output_dtype="float32",
        seams=True,
        cache_mb=0,  # every slab and unfinished chunk goes to disk and comes back
    )
    events = list(
        run_check(open_volume(synthetic_volume((20, 100, 100))), model, config, tmp_path / name)
    )
    summary = events[-1].summary
    assert isinstance(events[-1], RunFinished)
    root = zarr.open_group(str(tmp_path / name), mode="r")
    arrays = {
        key: root[f"{key}/0"][:] for key in ("pred_eval", "pred_train", "disparity", "seams_eval")
    }
    kept = {k: v for k, v in summary.items() if k not in ("timing", "out", "spilled_chunks")}
    return arrays, kept


def _unsaturated_model() -> torch.nn.Module:
    """A convolution and a BatchNorm with wide logits: probabilities from 1e-9 to 1, whose float64
    sums round, so an order of additions other than NumPy's shows in the results. (Probabilities
    of a few magnitudes sum exactly in float64 in any order, and a saturated U-Net's 0s and 1s do.)
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.BatchNorm3d(2))
    with torch.no_grad():
        model[1].weight.fill_(8.0)
        model[1].running_mean.fill_(0.1)
        model[1].running_var.fill_(0.5)
    return model.eval()


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_metrics_on_the_device_give_the_hosts_results_bit_for_bit(
    tmp_path, monkeypatch, activation
):
    """A GPU run's metrics path (tensors, slabs kept as tensors, torch sums), run on the CPU."""
    from napari_normcheck.core.measure import metrics
    from napari_normcheck.core.run import tileloop

    model = _unsaturated_model()
    host_arrays, host_summary = _run(tmp_path, "host.zarr", model, activation)
    monkeypatch.setattr(tileloop, "METRICS_ON_DEVICE", True)
    monkeypatch.setattr(metrics, "TORCH_SUMS_ON_CPU", True)
    device_arrays, device_summary = _run(tmp_path, "device.zarr", model, activation)
    for key, values in host_arrays.items():
        np.testing.assert_array_equal(device_arrays[key], values, err_msg=key)
    assert device_summary == host_summary
    # Pairs were compared (through slabs spilled and read back) and differ between tiles.
    assert host_summary["n_tile_pairs"] > 0 and host_summary["mismatch_train"]["soft"][0] > 0
