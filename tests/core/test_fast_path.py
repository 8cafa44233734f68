"""The GPU fast path, checked on the CPU: fused train pass, precision, staging, batch probe."""

import copy
from collections import deque

import numpy as np
import pytest
import torch
from torch import nn

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.base.tiling import plan_tiles
from napari_normcheck.core.models.per_sample_norm import per_sample_train_norm, supports_per_sample
from napari_normcheck.core.run.forward import (
    forward_batch,
    measure_precision_effect,
    probe_eval_batch,
)
from napari_normcheck.core.run.passes import Passes
from napari_normcheck.core.run.precision import precision_context, precision_disparity
from napari_normcheck.core.run.predictions import CHECK, bind_predictions
from napari_normcheck.core.run.staging import HostStaging
from napari_normcheck.core.run.tile_io import TileWork
from napari_normcheck.core.run.timing import Timing
from tests.conftest import calibrate, tiny_unet
from tests.core.test_modes import assert_state_equal, state_copy

CPU = torch.device("cpu")


def check_passes(model, eval_batch, train_batch, spatial_dims, fuse_train=False):
    """The eval and train passes of a check over ``model`` on the CPU."""
    bound = bind_predictions(model, CHECK, RunConfig(device="cpu"))
    return Passes(
        bound, eval_batch, train_batch, spatial_dims, CPU, Timing(), fuse_train=fuse_train
    )


def tiles_of_different_statistics(n=5, shape=(1, 16, 32, 32), seed=3):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=shape) * (0.2 + k) + 2 * k - 3).astype(np.float32) for k in range(n)]


@pytest.mark.parametrize(
    "norm", ["batch", ("instance", {"track_running_stats": True, "affine": True})]
)
def test_fused_train_pass_equals_batch_one_forwards(norm):
    model = calibrate(tiny_unet(norm), (1, 16, 32, 32))
    images = tiles_of_different_statistics()
    saved = state_copy(model)
    one_by_one = np.concatenate(
        [forward_batch(model, [image], "train", 3, CPU) for image in images]
    )
    # The per-sample normalization is the batch-1 train-mode normalization, bit for bit ...
    alone = np.concatenate(
        [forward_batch(model, [image], "train", 3, CPU, per_sample=True) for image in images]
    )
    np.testing.assert_array_equal(alone, one_by_one)
    # ... and batching leaves only the float rounding of batched convolutions (~1e-6 relative).
    fused = forward_batch(model, images, "train", 3, CPU, per_sample=True)
    scale = np.abs(one_by_one).max()
    np.testing.assert_allclose(fused, one_by_one, rtol=0, atol=2e-6 * scale)
    if norm == "batch":
        # Not a trivial equality: a BatchNorm forward of the 5 tiles shares their statistics.
        shared = forward_batch(model, images, "train", 3, CPU)
        assert np.abs(shared - one_by_one).max() > 1e-2
    assert_state_equal(model, saved)
    assert all("forward" not in vars(m) for m in model.modules()), (
        "the layers' own forwards are restored"
    )


def test_fused_train_pass_in_passes_matches_unfused_for_a_2d_model():
    model = calibrate(tiny_unet("batch", spatial_dims=2), (1, 32, 32))
    images = [im[:, :1] for im in tiles_of_different_statistics(n=4)]
    plan = plan_tiles((1, 32, 32), (1, 32, 32), overlap=0.0, blend="constant")
    tile = next(iter(plan.tiles()))
    results = {}
    for fuse in (False, True):
        pending = deque(TileWork(tile, image) for image in images)
        passes = check_passes(model, 3, 1, 2, fuse_train=fuse)
        assert passes.batch["train"] == (3 if fuse else 1)
        passes.run_ready(pending, final=True)
        results[fuse] = np.stack([w.outputs["train"] for w in pending])
    scale = np.abs(results[False]).max()
    np.testing.assert_allclose(results[True], results[False], rtol=0, atol=2e-6 * scale)


def test_fusion_is_refused_where_it_would_not_be_exact():
    class Renorm(nn.BatchNorm3d):
        """A subclass with a training forward of its own."""

    model = nn.Sequential(nn.Conv3d(1, 2, 3), Renorm(2))
    assert not supports_per_sample(model)
    assert not supports_per_sample(torch.jit.script(calibrate(tiny_unet("batch"), (1, 16, 32, 32))))
    with pytest.raises(ValueError), per_sample_train_norm(model):
        pass
    assert supports_per_sample(nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2)))
    # A Passes with train batch 2 never fuses: its tiles share statistics on purpose.
    assert not check_passes(model, 4, 2, 3, fuse_train=True).fuse_train


def test_precision_context_autocasts_and_keeps_norm_buffers_float32(batchnorm_unet):
    image = tiles_of_different_statistics(n=1)[0]
    buffers = {k: v.dtype for k, v in batchnorm_unet.state_dict().items()}
    reference = forward_batch(batchnorm_unet, [image], "eval", 3, CPU)
    reduced = forward_batch(batchnorm_unet, [image], "eval", 3, CPU, precision="bf16")
    assert reduced.dtype == np.float32
    difference = np.abs(reduced - reference).max()
    assert 0 < difference < 0.5 * np.abs(reference).max()  # bf16 really ran, and sanely
    assert {k: v.dtype for k, v in batchnorm_unet.state_dict().items()} == buffers
    with precision_context("bf16", CPU):
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError), precision_context("fp8", CPU):
        pass


def test_tf32_flags_are_set_by_the_first_thread_in_and_restored_by_the_last_out():
    """Concurrent forwards share PyTorch's process-wide TF32 flags: a thread leaving must not
    switch them under another's forward, and one that needs the other setting waits."""
    import threading
    import time

    from napari_normcheck.core.run.precision import _TF32Flags

    def conv_setting():
        return torch.backends.cudnn.conv.fp32_precision

    before = (conv_setting(), torch.backends.cuda.matmul.fp32_precision)
    flags = _TF32Flags()
    seen = []

    def forward(enabled, seconds, name):
        with flags.using(enabled):
            seen.append((name, "in", conv_setting()))
            time.sleep(seconds)
            seen.append((name, "out", conv_setting()))

    first = threading.Thread(target=forward, args=(False, 0.4, "first"))
    second = threading.Thread(target=forward, args=(False, 0.1, "second"))
    other = threading.Thread(target=forward, args=(True, 0.05, "tf32"))
    first.start()
    time.sleep(0.05)
    second.start()
    time.sleep(0.05)
    other.start()
    for thread in (first, second, other):
        thread.join()
    # The second thread left first: IEEE stayed for the first; the TF32 forward came after both.
    assert seen == [
        ("first", "in", "ieee"),
        ("second", "in", "ieee"),
        ("second", "out", "ieee"),
        ("first", "out", "ieee"),
        ("tf32", "in", "tf32"),
        ("tf32", "out", "tf32"),
    ]
    assert (conv_setting(), torch.backends.cuda.matmul.fp32_precision) == before
    with flags.using(False), pytest.raises(RuntimeError, match="other precision"):
        with flags.using(True):
            pass
    assert (conv_setting(), torch.backends.cuda.matmul.fp32_precision) == before


def test_precision_effect_is_measured_as_disparity(batchnorm_unet):
    images = tiles_of_different_statistics(n=2)
    effect = measure_precision_effect(batchnorm_unet, images, 3, CPU, "fp16", "sigmoid", 0.5)
    assert set(effect) == {"eval", "train"}
    for mode in effect.values():
        assert len(mode["hard"]) == 2 and all(0 <= v < 0.2 for v in mode["hard"])
    same = measure_precision_effect(batchnorm_unet, images, 3, CPU, "fp32", "sigmoid", 0.5)
    assert same["eval"]["hard"] == [0.0, 0.0] and same["train"]["soft"] == [0.0, 0.0]


def test_precision_disparity_counts_like_the_train_eval_disparity():
    a = np.zeros((2, 4, 4), np.float32)
    b = a.copy()
    a[0, :2] = 0.9  # 8 voxels foreground in one, 4 of them in the other
    b[0, :1] = 0.9
    result = precision_disparity([a], [b], 0.5, argmax=False)
    assert result["hard"][0] == pytest.approx(1 - 2 * 4 / (8 + 4))
    assert result["hard"][1] == 0.0  # empty against empty agrees


def test_config_validates_precision_and_round_trips_it():
    config = RunConfig(precision="bf16", fuse_train=False)
    assert RunConfig.from_dict(config.to_dict()) == config
    with pytest.raises(NormcheckError, match="precision"):
        RunConfig(precision="half")


def test_staging_on_the_cpu_stacks_and_probe_needs_no_gpu(batchnorm_unet):
    images = tiles_of_different_statistics(n=3)
    batch = HostStaging(CPU).to_device(images)
    assert batch.shape == (3, 1, 16, 32, 32) and torch.equal(batch[2], torch.from_numpy(images[2]))
    assert probe_eval_batch(batchnorm_unet, 1, (16, 32, 32), 3, CPU) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_staging_reuses_pinned_buffers_and_probe_finds_a_batch(batchnorm_unet):
    device = torch.device("cuda")
    staging = HostStaging(device)
    images = tiles_of_different_statistics(n=4)
    first = staging.to_device(images).cpu()
    second = staging.to_device(images[::-1]).cpu()
    third = staging.to_device(images[:2]).cpu()
    assert torch.equal(first[0], torch.from_numpy(images[0]))
    assert torch.equal(second[0], torch.from_numpy(images[3]))
    assert torch.equal(third[1], torch.from_numpy(images[1]))
    assert len(staging._slots[images[0].shape]) == 2
    model = copy.deepcopy(batchnorm_unet).to(device)
    assert probe_eval_batch(model, 1, (16, 32, 32), 3, device, limit=8) == 8
    cpu = forward_batch(batchnorm_unet, images, "train", 3, CPU, per_sample=True)
    gpu = forward_batch(model, images, "train", 3, device, per_sample=True, staging=staging)
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-4)


def test_a_reduced_precision_run_reports_its_effect_against_fp32(tmp_path, batchnorm_unet):
    from napari_normcheck.core.io.volume import open_volume
    from napari_normcheck.core.run.engine import run_check
    from napari_normcheck.core.run.events import RunFinished
    from napari_normcheck.core.run.report import build_report, format_summary
    from tests.conftest import synthetic_volume

    np.save(tmp_path / "v.npy", synthetic_volume((16, 40, 44)))
    config = RunConfig(
        tile=(16, 32, 32),
        activation="sigmoid",
        precision="bf16",
        device="cpu",
        output_dtype="float32",
    )
    events = list(
        run_check(open_volume(tmp_path / "v.npy"), batchnorm_unet, config, tmp_path / "o")
    )
    summary = events[-1].summary
    assert isinstance(events[-1], RunFinished)
    effect = summary["precision_effect"]
    assert effect["precision"] == "bf16" and effect["tiles"] == [0, 1, 2, 3]
    assert all(0 <= v <= 1 for mode in ("eval", "train") for v in effect[mode]["hard"])
    assert "bf16 against fp32 on 4 tiles" in format_summary(build_report(summary, {}))
    # The bf16 run's predictions really differ from an fp32 run's.
    fp32 = list(
        run_check(
            open_volume(tmp_path / "v.npy"),
            batchnorm_unet,
            config.replace(precision="fp32"),
            tmp_path / "f",
        )
    )[-1].summary
    assert "precision_effect" not in fp32
    import zarr

    a = zarr.open_group(str(tmp_path / "o"), mode="r")["pred_eval/0"][:]
    b = zarr.open_group(str(tmp_path / "f"), mode="r")["pred_eval/0"][:]
    assert 0 < np.abs(a - b).max() < 0.5


class LimitedMemory(nn.Module):
    """A real network that runs out of (simulated) GPU memory above a batch of 2."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        if x.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.model(x)


def test_out_of_memory_halves_batches_whose_results_do_not_depend_on_them(batchnorm_unet):
    model = LimitedMemory(batchnorm_unet)
    images = tiles_of_different_statistics(n=5)
    plan = plan_tiles((16, 32, 32), (16, 32, 32), overlap=0.0, blend="constant")
    tile = next(iter(plan.tiles()))
    pending = deque(TileWork(tile, image) for image in images)
    passes = check_passes(model, 4, 1, 3, fuse_train=True)
    passes.run_ready(pending, final=True)
    assert passes.batch == {"eval": 2, "train": 2}
    for work, image in zip(pending, images):
        for mode in ("eval", "train"):
            alone = forward_batch(batchnorm_unet, [image], mode, 3, CPU)[0]
            np.testing.assert_allclose(work.outputs[mode], alone, rtol=0, atol=1e-5)
    # Tiles of a shared train batch are never split: that would change their statistics.
    shared = check_passes(model, 1, 3, 3)
    with pytest.raises(NormcheckError, match="3 tiles .* smaller --tile or --train-batch"):
        shared.run_ready(deque(TileWork(tile, image) for image in images), final=True)
