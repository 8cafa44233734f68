"""Train the two packaged sample models and measure their train/eval disparity.

Both are the same tiny MONAI BasicUNet, one with BatchNorm and one with GroupNorm, trained the way
small 3D segmentation networks often are: batch size 1 on random tiles of one volume. The tiles swing
between bright empty resin and dense membranes, so the BatchNorm model's running statistics (an
exponential average over the last few tiles) match no tile in particular, and its eval-mode predictions
drift from its train-mode ones. GroupNorm has no running statistics and cannot drift.

Reproduce the packaged weights (about 2 x 5 minutes on one CPU thread)::

    python scripts/train_sample_models.py --seed 0 --steps 1200

Only measure the packaged (or freshly written) weights::

    python scripts/train_sample_models.py --check-only
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_normcheck.core.base.modes import normalization_mode
from napari_normcheck.data import SAMPLE_MODELS, SampleModel, make_synthetic_em

TRAIN_VOLUME_SHAPE = (64, 256, 256)
SAMPLE_SEED = 0  # the napari sample volume; training must never see it
CHANNEL_NAMES = ("membrane", "organelle")


def scale_intensity(raw: np.ndarray) -> torch.Tensor:
    """Apply the models' ``minmax:0,255`` spec: 0..255 to 0..1, shaped ``(1, 1, z, y, x)``."""
    return torch.from_numpy(raw.astype(np.float32) / 255.0)[None, None]


def random_tile(
    raw: np.ndarray, labels: np.ndarray, tile: tuple[int, int, int], rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop a random tile anywhere in the volume, with a random in-plane flip and rotation."""
    corner = [int(rng.integers(0, s - t + 1)) for s, t in zip(raw.shape, tile, strict=True)]
    box = tuple(slice(c, c + t) for c, t in zip(corner, tile, strict=True))
    image, target = raw[box], labels[(slice(None), *box)]
    turns = int(rng.integers(0, 4))
    image, target = np.rot90(image, turns, axes=(-2, -1)), np.rot90(target, turns, axes=(-2, -1))
    if rng.uniform() < 0.5:
        image, target = image[..., ::-1], target[..., ::-1]
    image_tensor = scale_intensity(np.ascontiguousarray(image))
    target_tensor = torch.from_numpy(np.ascontiguousarray(target).astype(np.float32))[None]
    return image_tensor, target_tensor


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE plus soft Dice per channel; Dice keeps the sparse organelle channel from collapsing to 0."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probability = torch.sigmoid(logits)
    dims = (0, 2, 3, 4)
    overlap = (probability * target).sum(dims)
    total = probability.sum(dims) + target.sum(dims)
    soft_dice = (2 * overlap + 1.0) / (total + 1.0)
    return bce + (1 - soft_dice).mean()


def train(
    sample: SampleModel,
    raw: np.ndarray,
    labels: np.ndarray,
    steps: int,
    seed: int,
    tile: tuple[int, int, int],
    learning_rate: float,
) -> nn.Module:
    """Train ``sample``'s architecture from scratch with batch size 1 on random tiles.

    A constant learning rate, as in many small-data setups: the weights keep moving to the end,
    so BatchNorm's running statistics average the last ~10 tiles of a still-changing network.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = sample.build()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    started = time.perf_counter()
    running_loss = 0.0
    for step in range(1, steps + 1):
        image, target = random_tile(raw, labels, tile, rng)
        loss = segmentation_loss(model(image), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
        if step % 100 == 0 or step == steps:
            elapsed = time.perf_counter() - started
            print(
                f"  [{sample.name}] step {step:5d}/{steps}  loss {running_loss / 100:.4f}"
                f"  {elapsed:6.1f} s",
                flush=True,
            )
            running_loss = 0.0
    return model.eval()


def predict_tiles(model: nn.Module, raw: np.ndarray, tile: tuple[int, int, int]) -> np.ndarray:
    """Probabilities on non-overlapping tiles (the volume must be a whole number of tiles)."""
    if any(s % t for s, t in zip(raw.shape, tile, strict=True)):
        raise ValueError(f"volume {raw.shape} is not a whole number of tiles {tile}")
    probability = np.zeros((2, *raw.shape), dtype=np.float32)
    for z in range(0, raw.shape[0], tile[0]):
        for y in range(0, raw.shape[1], tile[1]):
            for x in range(0, raw.shape[2], tile[2]):
                box = (slice(z, z + tile[0]), slice(y, y + tile[1]), slice(x, x + tile[2]))
                logits = model(scale_intensity(raw[box]))
                probability[(slice(None), *box)] = torch.sigmoid(logits)[0].numpy()
    return probability


def hard_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (they agree)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def measure(
    sample: SampleModel, model: nn.Module, raw: np.ndarray, labels: np.ndarray
) -> dict[str, list[float]]:
    """Hard disparity (1 - Dice, threshold 0.5) between the modes, and Dice of each mode vs labels."""
    with torch.inference_mode():
        with normalization_mode(model, "eval"):
            eval_mask = predict_tiles(model, raw, sample.tile) > 0.5
        with normalization_mode(model, "train"):
            train_mask = predict_tiles(model, raw, sample.tile) > 0.5
    truth = labels.astype(bool)
    channels = range(len(CHANNEL_NAMES))
    return {
        "disparity": [1.0 - hard_dice(train_mask[c], eval_mask[c]) for c in channels],
        "dice_train_vs_labels": [hard_dice(train_mask[c], truth[c]) for c in channels],
        "dice_eval_vs_labels": [hard_dice(eval_mask[c], truth[c]) for c in channels],
    }


def print_measurement(name: str, result: dict[str, list[float]]) -> None:
    """Print one model's numbers, one line per quantity."""
    for key, values in result.items():
        cells = "  ".join(f"{c}={v:.4f}" for c, v in zip(CHANNEL_NAMES, values, strict=True))
        print(f"  {name:9s} {key:22s} {cells}")


def load_from(sample: SampleModel, out_dir: pathlib.Path) -> nn.Module:
    """Load ``sample``'s weights from ``out_dir`` (which may differ from the packaged location)."""
    model = sample.build()
    path = out_dir / sample.path.name
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="torch and tile-sampling seed")
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps per model")
    parser.add_argument(
        "--out-dir",
        type=pathlib.Path,
        default=SAMPLE_MODELS["batchnorm"].path.parent,
        help="where the .pt state_dicts go (default: the package's models/ folder)",
    )
    parser.add_argument(
        "--volume-seed", type=int, default=1, help="seed of the synthetic training volume"
    )
    parser.add_argument("--tile", type=int, nargs=3, default=(32, 32, 32), help="training tile")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument(
        "--models", nargs="+", choices=sorted(SAMPLE_MODELS), default=sorted(SAMPLE_MODELS)
    )
    parser.add_argument(
        "--check-only", action="store_true", help="skip training; measure the weights in --out-dir"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.volume_seed == SAMPLE_SEED:
        print(f"--volume-seed must differ from the sample volume's seed {SAMPLE_SEED}")
        return 2
    # Leave the other core of a shared machine free; this also makes runs repeatable.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    sample_raw, sample_labels = make_synthetic_em(seed=SAMPLE_SEED)
    print(f"sample volume: make_synthetic_em(seed={SAMPLE_SEED}) shape {sample_raw.shape}")
    if not args.check_only:
        train_raw, train_labels = make_synthetic_em(TRAIN_VOLUME_SHAPE, seed=args.volume_seed)
        print(
            f"training volume: make_synthetic_em({TRAIN_VOLUME_SHAPE}, seed={args.volume_seed}); "
            f"tiles {tuple(args.tile)}, batch size 1, {args.steps} steps, seed {args.seed}"
        )
        args.out_dir.mkdir(parents=True, exist_ok=True)

    for name in args.models:
        sample = SAMPLE_MODELS[name]
        if args.check_only:
            model = load_from(sample, args.out_dir)
        else:
            started = time.perf_counter()
            model = train(
                sample,
                train_raw,
                train_labels,
                args.steps,
                args.seed,
                tuple(args.tile),
                args.lr,
            )
            path = args.out_dir / sample.path.name
            torch.save(model.state_dict(), path)
            print(
                f"  [{name}] trained in {time.perf_counter() - started:.0f} s; "
                f"wrote {path} ({path.stat().st_size / 1e6:.3f} MB)"
            )
        print(f"  [{name}] non-overlapping tiles {sample.tile} on the sample volume:")
        print_measurement(name, measure(sample, model, sample_raw, sample_labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
