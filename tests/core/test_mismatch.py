import numpy as np
import torch

from napari_normcheck.core.base.config import RunConfig
from napari_normcheck.core.base.modes import normalization_mode
from napari_normcheck.core.base.tiling import plan_tiles
from napari_normcheck.core.io.volume import open_volume
from napari_normcheck.core.measure.mismatch import prediction_box, tile_pairs
from napari_normcheck.core.run.engine import run_check
from tests.conftest import synthetic_volume, tiny_unet


def run_summary(volume, model, out, **config):
    events = list(run_check(open_volume(volume), model, RunConfig(**config), out))
    return events[-1].summary


def test_pairs_are_symmetric_and_cover_overlaps():
    plan = plan_tiles((20, 40, 44), (16, 32, 32), overlap=0.5)
    pairs = tile_pairs(plan)
    for i, items in pairs.items():
        for j, box in items:
            assert any(k == i and b == box for k, b in pairs[j])
    boxes = [prediction_box(plan, t) for t in plan.tiles()]
    for i in range(plan.n_tiles):
        for j in range(plan.n_tiles):
            overlap = all(
                max(a, c) < min(b, d)
                for a, b, c, d in zip(boxes[i][0], boxes[i][1], boxes[j][0], boxes[j][1])
            )
            assert (i != j and overlap) == any(k == j for k, _ in pairs[i])


def direct_predictions(plan, model, volume):
    """Independent: each tile's own sigmoid prediction by a direct forward, in both modes."""
    preds = {}
    for tile in plan.tiles():
        window = tuple(slice(w, w + s) for w, s in zip(tile.window_start, plan.window_shape))
        x = torch.from_numpy(np.ascontiguousarray(volume[window]))[None, None]
        preds[tile.index] = {}
        for mode in ("eval", "train"):
            with torch.inference_mode(), normalization_mode(model, mode):
                preds[tile.index][mode] = torch.sigmoid(model(x))[0].numpy()
    return preds


def overlapping_pairs(plan):
    """``(a, b, slices in a's window, slices in b's window, volume box)`` of every overlapping pair."""
    for a in plan.tiles():
        for b in plan.tiles()[a.index + 1 :]:
            lo = [max(p, q) for p, q in zip(a.window_start, b.window_start)]
            hi = [
                min(p + s, q + s)
                for p, q, s in zip(a.window_start, b.window_start, plan.window_shape)
            ]
            if any(p >= q for p, q in zip(lo, hi)):
                continue
            in_a = (slice(None), *[slice(p - w, q - w) for p, q, w in zip(lo, hi, a.window_start)])
            in_b = (slice(None), *[slice(p - w, q - w) for p, q, w in zip(lo, hi, b.window_start)])
            yield a, b, in_a, in_b, (slice(None), *[slice(p, q) for p, q in zip(lo, hi)])


def numpy_pair_mismatch(plan, preds, threshold=0.5):
    sums = {m: np.zeros((2, 2)) for m in ("eval", "train")}
    for a, b, in_a, in_b, _ in overlapping_pairs(plan):
        for mode in sums:
            pa, pb = preds[a.index][mode][in_a] > threshold, preds[b.index][mode][in_b] > threshold
            for c in range(2):
                sums[mode][c] += [(pa[c] & pb[c]).sum(), pa[c].sum() + pb[c].sum()]
    return {
        m: [1 - 2 * s[c, 0] / s[c, 1] if s[c, 1] else 0.0 for c in range(2)]
        for m, s in sums.items()
    }


def test_mismatch_and_seams_match_numpy_recomputation(tmp_path, batchnorm_unet):
    import zarr

    volume = synthetic_volume((16, 48, 48))
    summary = run_summary(
        volume,
        batchnorm_unet,
        tmp_path / "o.zarr",
        tile=(16, 32, 32),
        overlap=0.5,
        activation="sigmoid",
        blend="constant",
        seams=True,
        output_dtype="float32",
    )
    plan = plan_tiles((16, 48, 48), (16, 32, 32), overlap=0.5)
    preds = direct_predictions(plan, batchnorm_unet, volume)
    expected = numpy_pair_mismatch(plan, preds)
    np.testing.assert_allclose(summary["mismatch_eval"]["hard"], expected["eval"], atol=1e-4)
    np.testing.assert_allclose(summary["mismatch_train"]["hard"], expected["train"], atol=1e-4)
    # A 2 x 2 grid of half-overlapping tiles: every pair overlaps.
    assert summary["n_tile_pairs"] == 6
    expected = np.zeros((2, 16, 48, 48), np.float32)
    for a, b, in_a, in_b, box in overlapping_pairs(plan):
        difference = np.abs(preds[a.index]["eval"][in_a] - preds[b.index]["eval"][in_b])
        expected[box] = np.maximum(expected[box], difference)
    seams = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")["seams_eval/0"][:]
    np.testing.assert_allclose(seams, expected, atol=1e-5)
    assert seams.max() > 0


def test_what_a_user_should_see(tmp_path, batchnorm_unet):
    volume = synthetic_volume((16, 64, 64))
    config = {"tile": (16, 32, 32), "overlap": 0.5, "activation": "sigmoid"}
    group = run_summary(
        volume, tiny_unet(("group", {"num_groups": 2})), tmp_path / "g.zarr", **config
    )
    assert group["disparity"]["hard"] == [0.0, 0.0]
    assert max(group["mismatch_eval"]["soft"]) > 0
    batch = run_summary(volume, batchnorm_unet, tmp_path / "b.zarr", **config)
    assert max(batch["disparity"]["soft"]) > 0
    # Running statistics are the same for every tile: eval-mode seams are smaller than train-mode ones.
    assert max(batch["mismatch_eval"]["soft"]) < max(batch["mismatch_train"]["soft"])
