"""Read weight files as users have them: state_dicts (nested, prefixed), Lightning, safetensors.

``torch.load`` runs with ``weights_only=True``. A checkpoint that also pickles other Python objects
(a Lightning checkpoint's hyper-parameters, say) is read with a restricted unpickler that builds
only tensors and plain containers and replaces every other class by an inert placeholder, so no
code from the file runs; only a checkpoint whose weights *are* a pickled module needs
``--trust-pickle``.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from napari_normcheck.core.base.errors import NormcheckError, first_line

# Keys under which training scripts commonly nest the weights (plain, Lightning, custom loops).
_NESTED_KEYS = (
    "state_dict",
    "model_state_dict",
    "network_weights",  # nnU-Net v2's checkpoint_final.pth
    "model",
    "net",
    "network",
    "weights",
)
# Wrappers that prefix every key: DataParallel / DDP, Lightning modules, torch.compile.
_KEY_PREFIXES = ("module.", "model.", "net.", "_orig_mod.")
_SHOWN_KEYS = 5


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        # torch.jit.save writes code/ and constants.pkl; torch.save writes only data.pkl and data/.
        return any(
            "/code/" in name or name.endswith("constants.pkl") for name in archive.namelist()
        )


def _corrupt_message(path: Path) -> str:
    return f"cannot read {path}: it is corrupt, cut short or not a PyTorch file; save it again"


def _untrusted_message(path: Path, what: str) -> str:
    return (
        f"{path} is a pickle of Python objects{what}, e.g. a whole model, and loading it "
        "runs code from the file; pass --trust-pickle if you trust its source, or save "
        "model.state_dict() and pass --arch"
    )


def _read_checkpoint(path: Path, trust_pickle: bool, notes: list[str]) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses any pickled class by name ("GLOBAL module.Class"); anything
        # else it cannot parse is a damaged file.
        if "GLOBAL" not in str(error):
            raise NormcheckError(_corrupt_message(path)) from error
        if not trust_pickle:
            return _read_without_code(path, notes)
    except Exception as error:
        raise NormcheckError(_corrupt_message(path)) from error
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise NormcheckError(
            f"unpickling {path} failed ({first_line(error)}); the model's class must be importable "
            "(install its package), or save the state_dict and pass --arch"
        ) from error


def _read_without_code(path: Path, notes: list[str]) -> Any:
    """Read a checkpoint whose extra entries pickle classes, with those classes as placeholders.

    The weights are then found among tensors and plain containers; a checkpoint whose weights
    are only reachable through a pickled object (a whole model) still needs ``--trust-pickle``.
    """
    unpickler = RestrictedPickle()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=unpickler)
    except Exception as error:
        raise NormcheckError(_corrupt_message(path)) from error
    first = next(iter(unpickler.replaced), "")
    try:
        found = _find_weights(obj, path, [], placeholders=True)
    except NormcheckError:
        found = None
    if found is None or isinstance(found, nn.Module):
        raise NormcheckError(_untrusted_message(path, f" ({first})" if first else ""))
    shown = ", ".join(sorted(unpickler.replaced)[:3])
    notes.append(
        f"the checkpoint also pickles Python objects ({shown}); they were skipped without running "
        "their code"
    )
    return obj


class _Placeholder(dict):
    """Stands in for a pickled class that is not loaded (any arguments, state and items kept)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.pickled_args = args

    def __setstate__(self, state: Any) -> None:
        self.pickled_state = state

    def append(self, value: Any) -> None:  # noqa: D102 (list subclasses unpickle by appending)
        self.setdefault("__items__", []).append(value)

    def extend(self, values: Any) -> None:  # noqa: D102
        self.setdefault("__items__", []).extend(values)


class RestrictedPickle:
    """A ``pickle_module`` for ``torch.load`` that builds only what ``weights_only`` allows.

    Every other global becomes a :class:`_Placeholder` subclass named after it, so nothing from
    the file is imported or called. ``replaced`` lists the globals replaced.
    """

    __name__ = "napari_normcheck_restricted_pickle"

    def __init__(self) -> None:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = dict(_get_allowed_globals())
        replaced: dict[str, type] = {}
        self.replaced = replaced

        class Unpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                key = f"{module}.{name}"
                if key in allowed:
                    return allowed[key]
                if key not in replaced:
                    replaced[key] = type(name, (_Placeholder,), {"__module__": module})
                return replaced[key]

        self.Unpickler = Unpickler

    def load(self, file: Any, **kwargs: Any) -> Any:
        """``pickle.load`` with the restricted unpickler."""
        return self.Unpickler(file, **kwargs).load()


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as error:  # pragma: no cover - a dependency
        raise NormcheckError("reading .safetensors needs the safetensors package") from error
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:
        raise NormcheckError(f"cannot read {path} as safetensors ({first_line(error)})") from error


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as stream:
        header = stream.read(9)
    # An 8-byte little-endian header length, then the JSON header.
    return len(header) == 9 and header[8:9] == b"{" and int.from_bytes(header[:8], "little") < 1e8


def load_module(
    path: Path, arch: str | None, kwargs: dict[str, Any], trust_pickle: bool, notes: list[str]
) -> tuple[nn.Module, str]:
    """The module in a weight file and its format (``state_dict``, ``torchscript``, ``pickle``).

    Parameters
    ----------
    path : Path
        The file.
    arch : str or None
        The architecture for a state_dict (required there).
    kwargs : dict
        Its keyword arguments.
    trust_pickle : bool
        Allow unpickling arbitrary objects.
    notes : list of str
        Appended to: what the user should know.

    Returns
    -------
    module : torch.nn.Module
    format : str
    """
    from napari_normcheck.core.models.arch import build_architecture

    if _is_torchscript_archive(path):
        try:
            with warnings.catch_warnings():
                # TorchScript is deprecated for authors, but users still have these files.
                warnings.filterwarnings("ignore", r"`torch\.jit\.", DeprecationWarning)
                return torch.jit.load(str(path), map_location="cpu"), "torchscript"
        except Exception as error:
            raise NormcheckError(
                f"cannot load the TorchScript archive {path} ({first_line(error)[:120]}); "
                "export it again"
            ) from error
    if _is_safetensors(path):
        found: nn.Module | dict = _read_safetensors(path)
    else:
        found = _find_weights(_read_checkpoint(path, trust_pickle, notes), path, notes)
    if isinstance(found, nn.Module):
        return found, "pickle"
    if arch is None:
        raise NormcheckError(
            f"{path} holds only weights (a state_dict); pass --arch with the network class "
            "(e.g. monai.networks.nets:BasicUNet) and --arch-kwargs to build it"
        )
    module = build_architecture(arch, kwargs)
    _load_state_dict(module, found, path, arch, notes)
    return module, "state_dict"


def _find_weights(
    obj: Any, path: Path, notes: list[str], depth: int = 0, placeholders: bool = False
) -> nn.Module | dict:
    """The module or the tensor mapping inside a loaded checkpoint."""
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping) and not isinstance(obj, _Placeholder):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}
        if tensors and len(tensors) == len(obj):
            return tensors
        for key in _NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module | Mapping) and depth < 2:
                with contextlib.suppress(NormcheckError):
                    found = _find_weights(inner, path, notes, depth + 1, placeholders)
                    notes.append(f"weights taken from the checkpoint's {key!r} entry")
                    return found
        if tensors:
            notes.append(f"ignored {len(obj) - len(tensors)} non-tensor entries of the checkpoint")
            return tensors
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise NormcheckError(
            f"{path} holds no weights: its top-level keys are {keys}; save model.state_dict()"
        )
    raise NormcheckError(
        f"{path} holds a {type(obj).__name__}, not a model or state_dict; save model.state_dict()"
    )


def _strip_prefixes(state: dict, expected: set[str], notes: list[str]) -> dict:
    """Remove wrapper prefixes (``module.``, ``model.``) while that makes more keys match."""

    def score(keys: dict) -> int:
        return len(expected.intersection(keys))

    for _ in range(len(_KEY_PREFIXES)):
        for prefix in _KEY_PREFIXES:
            stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if stripped and score(stripped) > score(state):
                note = f"stripped prefix {prefix!r} from the checkpoint keys"
                dropped = [k for k in state if not k.startswith(prefix)]
                if dropped:
                    note += f"; ignored {len(dropped)} keys without it (e.g. {dropped[0]!r})"
                notes.append(note)
                state = stripped
                break
        else:
            break
    return state


def _load_state_dict(module: nn.Module, state: dict, path: Path, arch: str, notes: list[str]):
    own = module.state_dict()
    state = _strip_prefixes(state, set(own), notes)
    missing = [k for k in own if k not in state]
    # Checkpoints from before PyTorch 0.4.1 have no counter; the architecture's own one is kept.
    old_counters = [k for k in missing if k.endswith("num_batches_tracked")]
    missing = [k for k in missing if k not in old_counters]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:_SHOWN_KEYS])})")
        if unexpected:
            shown = ", ".join(unexpected[:_SHOWN_KEYS])
            parts.append(f"{len(unexpected)} unexpected (e.g. {shown})")
        raise NormcheckError(
            f"the weights in {path} do not fit --arch {arch!r}: keys {'; '.join(parts)}; "
            "check --arch and --arch-kwargs"
        )
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if mismatched:
        raise NormcheckError(
            f"the weights in {path} do not fit --arch {arch!r}: {len(mismatched)} shape mismatches "
            f"(checkpoint vs architecture), e.g. {'; '.join(mismatched[:_SHOWN_KEYS])}; "
            "check --arch-kwargs (channels, features)"
        )
    if old_counters:
        notes.append(f"the checkpoint has no num_batches_tracked for {len(old_counters)} layers")
    try:
        module.load_state_dict(state, strict=not old_counters)
    except Exception as error:
        raise NormcheckError(
            f"loading the weights of {path} into --arch {arch!r} failed ({first_line(error)})"
        ) from error
