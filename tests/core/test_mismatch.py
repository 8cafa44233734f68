import numpy as np
import torch

from napari_normcheck.core.config import RunConfig
from napari_normcheck.core.engine import run_check
from napari_normcheck.core.mismatch import prediction_box, tile_pairs
from napari_normcheck.core.modes import normalization_mode
from napari_normcheck.core.tiling import plan_tiles
from napari_normcheck.core.volume import open_volume
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


def numpy_pair_mismatch(plan, model, volume, threshold=0.5):
    """Independent: each tile's own sigmoid prediction by a direct forward, pairs compared in numpy."""
    preds = {}
    for tile in plan.tiles():
        sl = tuple(slice(w, w + s) for w, s in zip(tile.window_start, plan.window_shape))
        x = torch.from_numpy(np.ascontiguousarray(volume[sl]))[None, None]
        out = {}
        for mode in ("eval", "train"):
            with torch.inference_mode(), normalization_mode(model, mode):
                out[mode] = torch.sigmoid(model(x))[0].numpy().astype(np.float64)
        preds[tile.index] = out
    sums = {m: np.zeros((2, 2)) for m in ("eval", "train")}
    for tile in plan.tiles():
        for other in plan.tiles():
            if other.index <= tile.index:
                continue
            lo = [max(a, b) for a, b in zip(tile.window_start, other.window_start)]
            hi = [
                min(a + s, b + s)
                for a, b, s in zip(tile.window_start, other.window_start, plan.window_shape)
            ]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            for mode in sums:
                a = preds[tile.index][mode][
                    (
                        slice(None),
                        *[slice(a - w, h - w) for a, h, w in zip(lo, hi, tile.window_start)],
                    )
                ]
                b = preds[other.index][mode][
                    (
                        slice(None),
                        *[slice(a - w, h - w) for a, h, w in zip(lo, hi, other.window_start)],
                    )
                ]
                for c in range(2):
                    sums[mode][c] += [
                        ((a[c] > threshold) & (b[c] > threshold)).sum(),
                        (a[c] > threshold).sum() + (b[c] > threshold).sum(),
                    ]
    return {
        m: [1 - 2 * s[c, 0] / s[c, 1] if s[c, 1] else 0.0 for c in range(2)]
        for m, s in sums.items()
    }


def test_global_mismatch_matches_numpy_recomputation(tmp_path, batchnorm_unet):
    volume = synthetic_volume((16, 48, 48))
    summary = run_summary(
        volume,
        batchnorm_unet,
        tmp_path / "o.zarr",
        tile=(16, 32, 32),
        overlap=0.5,
        activation="sigmoid",
        blend="constant",
    )
    plan = plan_tiles((16, 48, 48), (16, 32, 32), overlap=0.5)
    expected = numpy_pair_mismatch(plan, batchnorm_unet, volume)
    np.testing.assert_allclose(summary["mismatch_eval"]["hard"], expected["eval"], atol=1e-4)
    np.testing.assert_allclose(summary["mismatch_train"]["hard"], expected["train"], atol=1e-4)
    assert (
        summary["n_tile_pairs"] == 6
    )  # a 2 x 2 grid of half-overlapping tiles: every pair overlaps


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


def test_seams_map_is_the_largest_pairwise_difference(tmp_path, batchnorm_unet):
    import zarr

    volume = synthetic_volume((16, 48, 48))
    run_summary(
        volume,
        batchnorm_unet,
        tmp_path / "o.zarr",
        tile=(16, 32, 32),
        overlap=0.5,
        activation="sigmoid",
        blend="constant",
    )
    plan = plan_tiles((16, 48, 48), (16, 32, 32), overlap=0.5)
    preds = {}
    for tile in plan.tiles():
        sl = tuple(slice(w, w + s) for w, s in zip(tile.window_start, plan.window_shape))
        x = torch.from_numpy(np.ascontiguousarray(volume[sl]))[None, None]
        with torch.inference_mode(), normalization_mode(batchnorm_unet, "eval"):
            preds[tile.index] = torch.sigmoid(batchnorm_unet(x))[0].numpy()
    expected = np.zeros((2, 16, 48, 48), np.float32)
    for a in plan.tiles():
        for b in plan.tiles():
            if b.index <= a.index:
                continue
            lo = [max(p, q) for p, q in zip(a.window_start, b.window_start)]
            hi = [
                min(p + s, q + s)
                for p, q, s in zip(a.window_start, b.window_start, plan.window_shape)
            ]
            if any(p >= q for p, q in zip(lo, hi)):
                continue
            pa = preds[a.index][
                (slice(None), *[slice(p - w, q - w) for p, q, w in zip(lo, hi, a.window_start)])
            ]
            pb = preds[b.index][
                (slice(None), *[slice(p - w, q - w) for p, q, w in zip(lo, hi, b.window_start)])
            ]
            box = (slice(None), *[slice(p, q) for p, q in zip(lo, hi)])
            expected[box] = np.maximum(expected[box], np.abs(pa - pb))
    seams = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")["seams_eval/0"][:]
    np.testing.assert_allclose(seams, expected, atol=1e-5)
    assert seams.max() > 0
