"""Per-tile feature statistics of chosen layers, recorded with forward hooks in the eval pass.

For every normalization layer with running statistics the input's per-channel mean and variance are
recorded per tile, with ``z = (tile_mean - running_mean) / sqrt(running_var + eps)``: how far the
running averages are from what this tile needs. Any other named module can be added (mean and variance
only). The cost is one mean and one variance per channel per layer per tile.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.base.modes import has_running_stats
from napari_normcheck.core.base.scratch import ScratchBuffer


@dataclass(frozen=True)
class FeatureLayer:
    """A recorded layer: its name, channel count and, for normalization layers, running statistics."""

    name: str
    channels: int | None
    running_mean: np.ndarray | None
    running_var: np.ndarray | None
    eps: float | None

    def z(self, mean: np.ndarray) -> np.ndarray | None:
        """``(tile_mean - running_mean) / sqrt(running_var + eps)`` per channel, or None."""
        if self.running_mean is None:
            return None
        return (mean - self.running_mean) / np.sqrt(self.running_var + self.eps)

    def to_dict(self) -> dict:
        """JSON-ready description with the running statistics."""
        return {
            "name": self.name,
            "channels": self.channels,
            "running_mean": None if self.running_mean is None else self.running_mean.tolist(),
            "running_var": None if self.running_var is None else self.running_var.tolist(),
            "eps": self.eps,
        }


def default_feature_layers(model: nn.Module) -> list[str]:
    """All normalization layers with running statistics, in module order (the first is the overlay)."""
    return [name for name, m in model.named_modules() if has_running_stats(m)]


class FeatureRecorder:
    """Records per-sample, per-channel input mean and variance of chosen modules during forwards.

    Parameters
    ----------
    model : torch.nn.Module
        The model the hooks are attached to (only while :meth:`recording` is active).
    names : list of str
        Qualified module names; unknown names raise a :class:`NormcheckError` listing valid ones.
    """

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            known = ", ".join(list(modules)[1:8])
            raise NormcheckError(
                f"no layer named {missing[0]!r} in the model; names look like: {known}, ... "
                "(see `napari-normcheck inspect`)"
            )
        self.model = model
        self.modules = {n: modules[n] for n in names}
        self.layers = [self._describe(n, m) for n, m in self.modules.items()]
        self._batch: dict[str, torch.Tensor] = {}  # this forward's moments, where computed
        # The normalized values the moments' kernel writes and nobody reads (forwards' thread).
        self._scratch = ScratchBuffer()

    @staticmethod
    def _describe(name: str, module: nn.Module) -> FeatureLayer:
        if has_running_stats(module):
            return FeatureLayer(
                name,
                int(module.running_mean.numel()),
                module.running_mean.detach().double().cpu().numpy().copy(),
                module.running_var.detach().double().cpu().numpy().copy(),
                float(module.eps),
            )
        return FeatureLayer(name, None, None, None, None)

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Attach the hooks for the forwards inside the block; they are always removed."""
        handles = []
        try:
            for name, module in self.modules.items():
                handles.append(module.register_forward_pre_hook(self._hook(name)))
            self._batch = {}
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str):
        def hook(_module: nn.Module, inputs: tuple) -> None:
            x = inputs[0]
            if not isinstance(x, torch.Tensor) or x.ndim < 3:
                return
            # (batch, ch, 2), kept where computed: a copy to the host here would wait for the
            # GPU in the middle of every forward, once per layer.
            self._batch[name] = per_sample_moments(x.detach(), self._scratch)

        return hook

    def take(self) -> list[dict[str, np.ndarray]]:
        """Statistics of the last forward, one dict per sample: ``{layer: (channels, 2)}``."""
        if not self._batch:
            return []
        batch, self._batch = self._batch, {}
        arrays = dict(zip(batch, _to_host(list(batch.values()))))
        n = next(iter(arrays.values())).shape[0]
        return [{name: v[i] for name, v in arrays.items()} for i in range(n)]


def _to_host(moments: list[torch.Tensor], one_copy: bool | None = None) -> list[np.ndarray]:
    """The layers' moments as NumPy arrays: from a GPU in one copy (the values unchanged).

    ``one_copy``: joined into one tensor first (default: where they are not on the CPU).
    """
    first = moments[0]
    alike = all(
        m.device == first.device and m.dtype == first.dtype and m.shape[0] == first.shape[0]
        for m in moments
    )
    if one_copy is None:
        one_copy = first.device.type != "cpu"
    if not (one_copy and alike):
        return [m.cpu().numpy() for m in moments]
    joined = torch.cat(moments, dim=1).cpu()
    return [part.numpy() for part in torch.split(joined, [m.shape[1] for m in moments], dim=1)]


def per_sample_moments(x: torch.Tensor, scratch: ScratchBuffer | None = None) -> torch.Tensor:
    """Mean and (biased) variance per sample and channel of ``(N, C, *spatial)``: ``(N, C, 2)``.

    One fused reduction, on the tensor's device: the training-mode batch norm kernel with every
    (sample, channel) pair as a channel of its own. On the CPU it costs about a quarter of
    ``torch.var_mean`` (a few percent of a convolution); the mean is the same, the variance within
    a few float32 ulps. The kernel also writes the normalized values, which are not wanted: into
    ``scratch``'s memory where given (a float32 layer input reused from tile to tile; new memory
    each time cost twice the kernel's time in page faults).
    """
    n, c = x.shape[:2]
    flat = x.reshape(1, n * c, -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    if scratch is not None and flat.dtype == torch.float32:
        discarded = scratch.empty(tuple(flat.shape), flat.device)
        _, mean, invstd = torch.ops.aten.native_batch_norm.out(
            flat,
            None,
            None,
            None,
            None,
            True,
            0.0,
            0.0,
            out=discarded,
            save_mean=flat.new_empty(n * c),
            save_invstd=flat.new_empty(n * c),
        )
    else:
        _, mean, invstd = torch.native_batch_norm(flat, None, None, None, None, True, 0.0, 0.0)
    invstd = invstd.double()
    # The kernel reports a constant channel (variance 0, eps 0) with invstd 0.
    var = torch.where(invstd > 0, invstd.reciprocal().square(), torch.zeros_like(invstd))
    return torch.stack([mean.double(), var], dim=-1).reshape(n, c, 2)


def tile_feature_summary(layers: list[FeatureLayer], stats: dict[str, np.ndarray]) -> dict:
    """Per-tile summary: for each layer its mean, var and (normalization layers) z per channel."""
    summary = {}
    for layer in layers:
        if layer.name not in stats:
            continue
        mean, var = stats[layer.name][:, 0], stats[layer.name][:, 1]
        z = layer.z(mean)
        summary[layer.name] = {
            "mean": mean.tolist(),
            "var": var.tolist(),
            "z": None if z is None else z.tolist(),
        }
    return summary
