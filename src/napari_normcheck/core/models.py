"""Load the model formats users have (state_dict + architecture, TorchScript, pickle) and probe them.

Every failure a user can cause (a missing file, a checkpoint that does not fit the architecture, a
pickle that was not trusted) is a :class:`~napari_normcheck.core.errors.NormcheckError` naming the
problem and the fix. Loading and probing never change the model: the probe runs in eval mode under
``torch.inference_mode()`` and restores training flags and buffers.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from napari_normcheck.core.errors import NormcheckError, first_line
from napari_normcheck.core.probe import ModelInfo, probe_model, probe_with_notes  # noqa: F401 (re-exported)

# Keys under which training scripts commonly nest the weights (plain, Lightning, custom loops).
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "weights")
# Wrappers that prefix every key: DataParallel / DDP, Lightning modules, torch.compile.
_KEY_PREFIXES = ("module.", "model.", "_orig_mod.")
_SHOWN_KEYS = 5


@dataclass
class LoadedModel:
    """A model ready for the two-mode check, with where it came from and what to tell the user.

    Attributes
    ----------
    module : torch.nn.Module
        On CPU, in eval mode.
    format : str
        ``"state_dict"``, ``"torchscript"``, ``"pickle"`` or ``"bioimageio"``.
    path : str
        The model file.
    sha256 : str
        Hex digest of the model file (for a folder package: of its weights file).
    info : ModelInfo
        Result of :func:`probe_model`.
    switchable : bool
        False when the normalization mode cannot be switched (e.g. traced TorchScript).
    not_switchable_reason : str or None
        Why not, and how to export the model so that it can be switched.
    notes : list of str
        Things the user should know (stripped key prefixes, ignored arguments, ...).
    arch, arch_kwargs : str or None, dict or None
        The architecture used to rebuild a state_dict.
    preprocessing, postprocessing : dict or None
        Declared processing steps (bioimage.io packages); None when the format has none.
    """

    module: nn.Module
    format: str
    path: str
    sha256: str
    info: ModelInfo
    switchable: bool = True
    not_switchable_reason: str | None = None
    notes: list[str] = field(default_factory=list)
    arch: str | None = None
    arch_kwargs: dict[str, Any] | None = None
    preprocessing: dict[str, Any] | None = None
    postprocessing: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Everything but the module, for reports and store metadata."""
        return {
            "format": self.format,
            "path": self.path,
            "sha256": self.sha256,
            "info": self.info.to_dict(),
            "switchable": self.switchable,
            "not_switchable_reason": self.not_switchable_reason,
            "notes": list(self.notes),
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            "preprocessing": self.preprocessing,
            "postprocessing": self.postprocessing,
        }


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks so large weights do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- architectures and their keyword arguments ------------------------------------------------


def resolve_callable(spec: str) -> Callable[..., Any]:
    """Find the class or function named by ``spec``.

    Parameters
    ----------
    spec : str
        ``"package.module:Name"``, ``"package.module.Name"``, ``"path/to/file.py:Name"`` or a bare
        ``"Name"`` from :mod:`monai.networks.nets`. ``Name`` may be dotted (``Outer.Inner``).

    Returns
    -------
    callable
        The object found.

    Raises
    ------
    NormcheckError
        When the module, file or name does not exist, fails to import or is not callable.
    """
    spec = spec.strip()
    module_part, sep, name = spec.rpartition(":")
    if sep and (module_part.endswith(".py") or "/" in module_part or "\\" in module_part):
        target = _getattr_path(_import_file(Path(module_part), spec), name, spec)
    elif sep:
        target = _getattr_path(_import_module(module_part, spec), name, spec)
    elif "." in spec:
        target = _resolve_dotted(spec)
    else:
        target = _getattr_path(_import_module("monai.networks.nets", spec), spec, spec)
    if not callable(target):
        raise NormcheckError(f"--arch {spec!r} is not a class or function; name the network class")
    return target


def _import_module(module_name: str, spec: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except Exception as error:
        raise NormcheckError(
            f"--arch {spec!r}: cannot import {module_name!r} ({first_line(error)}); "
            "check the spelling or install the package that defines the network"
        ) from error


def _import_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise NormcheckError(f"--arch {spec!r}: file {path} not found; check the path")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"_normcheck_arch_{path.stem}_{digest}"
    file_spec = importlib.util.spec_from_file_location(module_name, path)
    if file_spec is None or file_spec.loader is None:
        raise NormcheckError(f"--arch {spec!r}: {path} is not a Python file; give a .py file")
    module = importlib.util.module_from_spec(file_spec)
    # Run afresh on every call, so an edited file is picked up (the widget resolves repeatedly).
    # Registered before running so dataclasses and pickling inside the file can find it; the
    # file's folder is importable while it runs so it can import its sibling modules.
    sys.modules[module_name] = module
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        file_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise NormcheckError(
            f"--arch {spec!r}: running {path} failed ({first_line(error)}); fix the file"
        ) from error
    finally:
        sys.path.remove(str(path.parent.resolve()))
    return module


def _getattr_path(owner: Any, dotted_name: str, spec: str) -> Any:
    target = owner
    for part in dotted_name.split("."):
        if not hasattr(target, part):
            where = getattr(owner, "__file__", None) or getattr(owner, "__name__", "the module")
            raise NormcheckError(f"--arch {spec!r}: {where} has no {dotted_name!r}; check the name")
        target = getattr(target, part)
    return target


def _resolve_dotted(spec: str) -> Any:
    parts = spec.split(".")
    # The longest importable module prefix wins; the rest is an attribute path inside it.
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and not module_name.startswith(error.name):
                raise NormcheckError(
                    f"--arch {spec!r}: importing {module_name!r} failed ({first_line(error)}); "
                    "install the missing package"
                ) from error
            continue
        except Exception as error:
            raise NormcheckError(
                f"--arch {spec!r}: importing {module_name!r} failed ({first_line(error)})"
            ) from error
        return _getattr_path(module, ".".join(parts[cut:]), spec)
    raise NormcheckError(
        f"--arch {spec!r}: no importable module in it; use 'package.module:Name' or 'file.py:Name'"
    )


def parse_kwargs(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Read architecture keyword arguments.

    Parameters
    ----------
    text : str, dict or None
        An inline JSON object (``'{"spatial_dims": 3}'``), ``"@file.json"``, a dictionary, or None.

    Returns
    -------
    dict
        The keyword arguments (JSON arrays stay lists).

    Raises
    ------
    NormcheckError
        When the file is missing, the JSON is invalid (with its position) or not an object.
    """
    if text is None:
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    source = "--arch-kwargs"
    text = text.strip()
    if text.startswith("@"):
        file = Path(text[1:])
        if not file.is_file():
            raise NormcheckError(f"--arch-kwargs file {file} not found; check the path after '@'")
        source, text = str(file), file.read_text(encoding="utf-8")
    if not text.strip():
        return {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as error:
        raise NormcheckError(
            f"{source} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno} "
            f"(char {error.pos}); write an object like '{{\"spatial_dims\": 3}}'"
        ) from error
    if not isinstance(kwargs, dict):
        raise NormcheckError(
            f"{source} must be a JSON object of keyword arguments, not {type(kwargs).__name__}"
        )
    return kwargs


def _build_architecture(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    factory = resolve_callable(arch)
    try:
        module = factory(**kwargs)
    except NormcheckError:
        raise
    except Exception as error:
        raise NormcheckError(
            f"building --arch {arch!r} with --arch-kwargs {json.dumps(kwargs, default=str)} "
            f"failed ({first_line(error)}); check the keyword arguments"
        ) from error
    if not isinstance(module, nn.Module):
        raise NormcheckError(
            f"--arch {arch!r} returned a {type(module).__name__}, not a torch.nn.Module"
        )
    return module


# --- reading files ------------------------------------------------------------------------------


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


def _read_checkpoint(path: Path, trust_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses any pickled class by name ("GLOBAL module.Class"); anything
        # else it cannot parse is a damaged file.
        if "GLOBAL" not in str(error):
            raise NormcheckError(_corrupt_message(path)) from error
        if not trust_pickle:
            found = re.search(r"GLOBAL (\S+)", str(error))
            what = f" ({found.group(1)})" if found else ""
            raise NormcheckError(
                f"{path} is a pickle of Python objects{what}, e.g. a whole model, and loading it "
                "runs code from the file; pass --trust-pickle if you trust its source, or save "
                "model.state_dict() and pass --arch"
            ) from error
    except Exception as error:
        raise NormcheckError(_corrupt_message(path)) from error
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise NormcheckError(
            f"unpickling {path} failed ({first_line(error)}); the model's class must be importable "
            "(install its package), or save the state_dict and pass --arch"
        ) from error


def _find_weights(obj: Any, path: Path, notes: list[str], depth: int = 0) -> nn.Module | dict:
    """The module or the tensor mapping inside a loaded checkpoint."""
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}
        if tensors and len(tensors) == len(obj):
            return tensors
        for key in _NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module | Mapping) and depth < 2:
                with contextlib.suppress(NormcheckError):
                    found = _find_weights(inner, path, notes, depth + 1)
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


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: str | Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    spatial_dims: int | None = None,
    in_channels: int | None = None,
) -> LoadedModel:
    """Load a model file of any supported format onto the CPU and probe it.

    Parameters
    ----------
    path : str or Path
        A state_dict checkpoint (plain or nested under ``state_dict``/``model``/... keys), a
        TorchScript archive, a pickled ``nn.Module``, or a bioimage.io package (a folder or
        ``.zip`` with ``rdf.yaml``; see :mod:`napari_normcheck.core.bioimageio`).
    arch : str, optional
        The architecture for a state_dict (see :func:`resolve_callable`); required there.
    arch_kwargs : str, dict or None
        Keyword arguments for ``arch`` (see :func:`parse_kwargs`).
    trust_pickle : bool
        Allow loading pickled Python objects, which runs code from the file.
    spatial_dims, in_channels : int, optional
        Override what the probe reads from the first convolution.

    Returns
    -------
    LoadedModel
        The module in eval mode with its probe results and notes.

    Raises
    ------
    NormcheckError
        For a missing or corrupt file, an untrusted pickle, a missing or ill-fitting architecture.
    """
    path = Path(path)
    if not path.exists():
        raise NormcheckError(f"model file {path} not found; check the path")
    from napari_normcheck.core import bioimageio

    if bioimageio.is_package(path):
        package = bioimageio.load_package(
            path, trust_pickle=trust_pickle, spatial_dims=spatial_dims, in_channels=in_channels
        )
        if arch is not None or arch_kwargs is not None:
            package.notes.append("--arch/--arch-kwargs ignored: the package names its architecture")
        return package
    if path.is_dir():
        raise NormcheckError(
            f"{path} is a folder without rdf.yaml or bioimageio.yaml: pass the weights file "
            "(TorchScript, or a state_dict with --arch) or a bioimage.io package"
        )
    kwargs = parse_kwargs(arch_kwargs)
    notes: list[str] = []
    if _is_torchscript_archive(path):
        try:
            with warnings.catch_warnings():
                # TorchScript is deprecated for authors, but users still have these files.
                warnings.filterwarnings("ignore", r"`torch\.jit\.", DeprecationWarning)
                module: nn.Module = torch.jit.load(str(path), map_location="cpu")
        except Exception as error:
            raise NormcheckError(
                f"cannot load the TorchScript archive {path} ({first_line(error)[:120]}); "
                "export it again"
            ) from error
        model_format = "torchscript"
    else:
        found = _find_weights(_read_checkpoint(path, trust_pickle), path, notes)
        if isinstance(found, nn.Module):
            module, model_format = found, "pickle"
        else:
            if arch is None:
                raise NormcheckError(
                    f"{path} holds only weights (a state_dict); pass --arch with the network class "
                    "(e.g. monai.networks.nets:BasicUNet) and --arch-kwargs to build it"
                )
            module = _build_architecture(arch, kwargs)
            _load_state_dict(module, found, path, arch, notes)
            model_format = "state_dict"
    if model_format != "state_dict" and arch is not None:
        notes.append(f"--arch {arch!r} ignored: the file holds a whole {model_format} model")
    module.eval()
    # Read the graph before any forward: once TorchScript has run a model without optimization,
    # its inlined_graph keeps prim::CallMethod nodes that hide the norm ops.
    reason = _not_switchable_reason(module)
    info, probe_notes = probe_with_notes(module, spatial_dims, in_channels)
    notes.extend(probe_notes)
    return LoadedModel(
        module=module,
        format=model_format,
        path=str(path),
        sha256=file_sha256(path),
        info=info,
        switchable=reason is None,
        not_switchable_reason=reason,
        notes=notes,
        arch=arch if model_format == "state_dict" else None,
        arch_kwargs=kwargs if model_format == "state_dict" else None,
    )


# --- can the normalization mode be switched? ----------------------------------------------------

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


def _not_switchable_reason(module: nn.Module) -> str | None:
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


# --- probing ------------------------------------------------------------------------------------
