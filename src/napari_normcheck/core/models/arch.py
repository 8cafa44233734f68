"""Find the network class a user names and build it: installed packages, a file, MONAI by name.

A user's own network file may import modules beside it (``from blocks import conv``) or be part
of a package (``from .blocks import conv``, found through the ``__init__.py`` files above it).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from napari_normcheck.core.base.errors import NormcheckError, first_line


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


def _package_root(path: Path) -> Path | None:
    """The top folder of the package ``path`` sits in (folders with ``__init__.py``), or None."""
    root = None
    folder = path.parent
    while (folder / "__init__.py").is_file():
        root = folder
        folder = folder.parent
    return root


def _import_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise NormcheckError(f"--arch {spec!r}: file {path} not found; check the path")
    path = path.resolve()
    root = _package_root(path)
    if root is not None:
        return _import_package_file(path, root, spec)
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    module_name = f"_normcheck_arch_{path.stem}_{digest}"
    file_spec = importlib.util.spec_from_file_location(module_name, path)
    if file_spec is None or file_spec.loader is None:
        raise NormcheckError(f"--arch {spec!r}: {path} is not a Python file; give a .py file")
    module = importlib.util.module_from_spec(file_spec)
    # Run afresh on every call, so an edited file is picked up (the widget resolves repeatedly).
    # Registered before running so dataclasses and pickling inside the file can find it; the
    # file's folder is importable while it runs so it can import its sibling modules.
    sys.modules[module_name] = module
    sys.path.insert(0, str(path.parent))
    try:
        file_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise NormcheckError(
            f"--arch {spec!r}: running {path} failed ({first_line(error)}); fix the file"
        ) from error
    finally:
        sys.path.remove(str(path.parent))
    return module


def _import_package_file(path: Path, root: Path, spec: str) -> Any:
    """Import a file that sits in a package by its dotted name, so relative imports work."""
    parts = [*path.relative_to(root.parent).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    dotted = ".".join(parts)
    parent = str(root.parent)
    # The package's modules run afresh, so edited files are picked up.
    for name in [n for n in sys.modules if n == parts[0] or n.startswith(f"{parts[0]}.")]:
        loaded_from = getattr(sys.modules[name], "__file__", None) or ""
        if loaded_from.startswith(str(root)):
            del sys.modules[name]
    sys.path.insert(0, parent)
    try:
        return importlib.import_module(dotted)
    except Exception as error:
        raise NormcheckError(
            f"--arch {spec!r}: importing {path} as {dotted} (package {root}) failed "
            f"({first_line(error)}); fix the file"
        ) from error
    finally:
        sys.path.remove(parent)


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


def build_architecture(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    """Build ``arch`` (see :func:`resolve_callable`) with ``kwargs``; a NormcheckError on failure."""
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


def read_arch_spec(path: str | Path) -> tuple[str, dict[str, Any]]:
    """Read an architecture spec file: the network and its keyword arguments in one place.

    Parameters
    ----------
    path : str or Path
        A JSON or YAML (``.yaml``/``.yml``) file holding an object such as
        ``{"arch": "monai.networks.nets.BasicUNet", "kwargs": {"spatial_dims": 3}}``
        (``arch_kwargs`` is accepted for ``kwargs``; ``kwargs`` may be left out).

    Returns
    -------
    arch : str
        The architecture (see :func:`resolve_callable`).
    kwargs : dict
        Its keyword arguments.

    Raises
    ------
    NormcheckError
        When the file is missing or unreadable, or does not hold ``arch`` and a ``kwargs`` object.
    """
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise NormcheckError(f"architecture spec {path} not found; check the path")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            spec = yaml.safe_load(text)
        else:
            spec = json.loads(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise NormcheckError(
            f"architecture spec {path} cannot be read ({first_line(error)}); write an object like "
            '{"arch": "monai.networks.nets.BasicUNet", "kwargs": {"spatial_dims": 3}}'
        ) from error
    if not isinstance(spec, dict) or not isinstance(spec.get("arch"), str):
        raise NormcheckError(
            f'architecture spec {path} must hold an object with "arch" (the network class) and '
            '"kwargs" (its keyword arguments)'
        )
    kwargs = spec.get("kwargs", spec.get("arch_kwargs", {}))
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise NormcheckError(
            f'architecture spec {path}: "kwargs" must be an object of keyword arguments, '
            f"not {type(kwargs).__name__}"
        )
    return spec["arch"], kwargs
