"""Whether the normalization mode of a model can be switched (traced or frozen TorchScript cannot)."""

from __future__ import annotations

import torch
from torch import nn

# aten op -> (index of running_mean, index of the training / use_input_stats flag)
_NORM_OPS = {
    "aten::batch_norm": (3, 5),
    "aten::native_batch_norm": (3, 5),
    "aten::instance_norm": (3, 5),
}


def _fixed_training_flags(script_module: torch.jit.ScriptModule) -> list[bool]:
    """The constant training flags of norm ops with running statistics in a TorchScript graph.

    A scripted BatchNorm reads ``self.training`` (a ``prim::GetAttr``); tracing records the flag
    the model had while being traced as a ``prim::Constant``, which no attribute can change later.
    """
    flags = []
    graph = script_module.inlined_graph  # a fresh copy each access: keep it alive while reading
    for kind, (mean_index, flag_index) in _NORM_OPS.items():
        for node in graph.findAllNodes(kind):
            inputs = list(node.inputs())
            running_mean = inputs[mean_index]
            if running_mean.type().kind() == "NoneType" or (
                running_mean.node().kind() == "prim::Constant" and running_mean.toIValue() is None
            ):
                continue
            if inputs[flag_index].node().kind() == "prim::Constant":
                flags.append(bool(inputs[flag_index].toIValue()))
    return flags


def not_switchable_reason(module: nn.Module) -> str | None:
    """Why train and eval statistics cannot be compared in ``module`` (None when they can)."""
    for root in _script_roots(module):
        no_state = next(root.parameters(), None) is None and next(root.buffers(), None) is None
        graph = root.inlined_graph
        if no_state and any("conv" in node.kind() for node in graph.nodes()):
            return _frozen_reason()
        flags = _fixed_training_flags(root)
        if flags:
            mode = "train" if all(flags) else "eval" if not any(flags) else "mixed"
            return (
                f"the TorchScript model has the {mode}-mode flag of {len(flags)} normalization "
                "layer(s) baked in (it was made with torch.jit.trace), so train and eval statistics "
                "cannot be compared; export it with torch.jit.script(model), or give the "
                "state_dict with --arch"
            )
    return None


def _script_roots(module: nn.Module) -> list[torch.jit.ScriptModule]:
    """The outermost TorchScript modules in ``module`` (itself, or scripted parts of an eager one)."""
    roots: list[tuple[str, torch.jit.ScriptModule]] = []
    for name, sub in module.named_modules():
        if not isinstance(sub, torch.jit.ScriptModule):
            continue
        if any(not root or name.startswith(f"{root}.") for root, _ in roots):
            continue
        roots.append((name, sub))
    return [sub for _, sub in roots]


def _frozen_reason() -> str:
    return (
        "the TorchScript model was frozen (torch.jit.freeze): its normalization is folded into "
        "constants; export it with torch.jit.script(model) without freezing, or give the state_dict "
        "with --arch"
    )
