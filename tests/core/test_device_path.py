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
