"""Safe extraction of bioimage.io package zips into a cache folder.

Member names that would land outside the extraction folder (zip slip) and archives that inflate
past the size or compression-ratio limits (zip bombs) are refused before anything is written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from napari_normcheck.core.base.errors import NormcheckError
from napari_normcheck.core.models.model_file import file_sha256

# Zip-bomb limits: total uncompressed size, and the compression ratio of any large entry.
MAX_UNPACKED_BYTES = 2 * 1024**3
MAX_COMPRESSION_RATIO = 200
_RATIO_CHECK_MIN_BYTES = 1024**2


def _check_member_name(name: str, zip_path: Path) -> None:
    pure = PurePosixPath(name.replace("\\", "/"))
    drive = len(name) > 1 and name[1] == ":"
    if pure.is_absolute() or drive or ".." in pure.parts:
        raise NormcheckError(
            f"{zip_path} holds an unsafe path {name!r} (absolute or with '..') that would be "
            "written outside the extraction folder; the package is refused"
        )


def _check_sizes(archive: zipfile.ZipFile, zip_path: Path, max_unpacked_bytes: int) -> None:
    total = 0
    for info in archive.infolist():
        total += info.file_size
        if total > max_unpacked_bytes:
            raise NormcheckError(
                f"{zip_path} unpacks to more than {max_unpacked_bytes / 1024**3:g} GiB; "
                "refused as a possible zip bomb"
            )
        if info.file_size > _RATIO_CHECK_MIN_BYTES:
            ratio = info.file_size / max(1, info.compress_size)
            if ratio > MAX_COMPRESSION_RATIO:
                raise NormcheckError(
                    f"{zip_path}: {info.filename!r} is compressed {ratio:.0f}:1 (limit "
                    f"{MAX_COMPRESSION_RATIO}:1); refused as a possible zip bomb"
                )


def cache_root() -> Path:
    """Parent folder of extracted package zips: ``<temp>/napari-normcheck-bioimageio``."""
    return Path(tempfile.gettempdir()) / "napari-normcheck-bioimageio"


def extract_package(
    zip_path: str | Path,
    cache_dir: str | Path | None = None,
    *,
    max_unpacked_bytes: int | None = None,
) -> Path:
    """Extract a package zip safely into a cache folder keyed by the zip's SHA-256.

    Parameters
    ----------
    zip_path : str or Path
        The ``.zip`` package.
    cache_dir : str or Path, optional
        Parent of the extraction folders; default :func:`cache_root`.
    max_unpacked_bytes : int, optional
        Limit on the total uncompressed size; default :data:`MAX_UNPACKED_BYTES`.

    Returns
    -------
    Path
        The folder holding the extracted package (reused when already extracted).

    Raises
    ------
    NormcheckError
        For absolute or ``..`` member names (zip slip), or a total size or compression ratio
        over the limits (zip bomb). Nothing is written in that case.
    """
    zip_path = Path(zip_path)
    parent = Path(cache_dir) if cache_dir is not None else cache_root()
    limit = MAX_UNPACKED_BYTES if max_unpacked_bytes is None else max_unpacked_bytes
    target = parent / file_sha256(zip_path)
    if (target / ".complete").is_file():
        return target
    with zipfile.ZipFile(zip_path) as archive:
        for name in archive.namelist():
            _check_member_name(name, zip_path)
        _check_sizes(archive, zip_path, limit)
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=parent))
        try:
            budget = limit
            for info in archive.infolist():
                destination = staging.joinpath(*PurePosixPath(info.filename).parts)
                if not destination.resolve().is_relative_to(staging.resolve()):
                    raise NormcheckError(f"{zip_path}: unsafe path {info.filename!r} refused")
                if info.is_dir():
                    destination.mkdir(parents=True, exist_ok=True)
                    continue
                destination.parent.mkdir(parents=True, exist_ok=True)
                # Count the bytes actually inflated: headers can lie about sizes.
                with archive.open(info) as source, open(destination, "wb") as sink:
                    for chunk in iter(lambda src=source: src.read(1 << 20), b""):
                        budget -= len(chunk)
                        if budget < 0:
                            raise NormcheckError(
                                f"{zip_path} inflates past its declared size limit; refused as "
                                "a possible zip bomb"
                            )
                        sink.write(chunk)
            (staging / ".complete").touch()
            try:
                os.replace(staging, target)
            except OSError:
                # Another process finished the same extraction first.
                shutil.rmtree(staging, ignore_errors=True)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise NormcheckError(
                f"{zip_path} is a damaged zip ({error}); download it again"
            ) from error
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target
