"""Compare two runs' outputs bit for bit: every array of two OUT.zarr stores, and two reports.

Run: ``python scripts/compare_outputs.py A.zarr B.zarr [--reports A.json B.json]``. Prints each
array that differs (with its largest difference) and each report key that differs, ignoring what
describes the run rather than its result (``out``, ``source``, ``timing``, ``versions``); exits 1
when anything differs. Used to check that a change keeps every result equal, by running the same
command with the code before and after it (``PYTHONPATH=<worktree>/src``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import zarr

#: Report keys that describe the run, not its result.
RUN_KEYS = {"out", "timing", "versions", "source"}


def array_differences(a: zarr.Group, b: zarr.Group, prefix: str = "") -> tuple[int, list[str]]:
    """The number of arrays compared and a line per array that is not equal (or missing)."""
    compared, lines = 0, []
    for name in sorted(set(a.array_keys()) | set(b.array_keys())):
        if name not in a or name not in b:
            lines.append(f"{prefix}{name}: only in {'B' if name not in a else 'A'}")
            continue
        x, y = a[name][...], b[name][...]
        compared += 1
        if x.shape != y.shape or x.dtype != y.dtype:
            lines.append(f"{prefix}{name}: {x.shape} {x.dtype} against {y.shape} {y.dtype}")
        elif not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
            largest = np.nanmax(np.abs(x.astype(np.float64) - y.astype(np.float64)))
            lines.append(f"{prefix}{name}: differs, largest difference {largest:g}")
    for name in sorted(set(a.group_keys()) & set(b.group_keys())):
        n, more = array_differences(a[name], b[name], f"{prefix}{name}/")
        compared += n
        lines += more
    return compared, lines


def report_differences(a: dict, b: dict) -> list[str]:
    """A line per result key of two reports whose values differ."""
    keys = (set(a) | set(b)) - RUN_KEYS
    return [f"report {key}: differs" for key in sorted(keys) if a.get(key) != b.get(key)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--reports", nargs=2, metavar=("A.json", "B.json"))
    args = parser.parse_args(argv)
    for path in (args.a, args.b, *(args.reports or ())):
        if not Path(path).exists():
            parser.error(f"{path} not found")
    compared, lines = array_differences(
        zarr.open_group(args.a, mode="r"), zarr.open_group(args.b, mode="r")
    )
    if args.reports:
        reports = [json.loads(open(path).read()) for path in args.reports]
        lines += report_differences(*reports)
    for line in lines:
        print(line)
    what = f"{compared} arrays" + (" and the reports" if args.reports else "")
    print(f"{what}: {'equal bit for bit' if not lines else f'{len(lines)} differ'}")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
