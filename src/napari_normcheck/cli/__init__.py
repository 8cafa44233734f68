"""The command line: ``napari-normcheck run | inspect | demo | recalibrate | fold | sweep``.

One module per subcommand, each adding its parser and wrapping one core function; the model flags
they share live in :mod:`~napari_normcheck.cli.model_args`.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from napari_normcheck.cli.demo import add_demo_parser
from napari_normcheck.cli.inspect import add_inspect_parser
from napari_normcheck.cli.remedies import add_fold_parser, add_recalibrate_parser
from napari_normcheck.cli.run import add_run_parser
from napari_normcheck.cli.sweep import add_sweep_parser
from napari_normcheck.core.base.errors import NormcheckError, NormcheckNotice


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of all subcommands."""
    parser = argparse.ArgumentParser(
        prog="napari-normcheck",
        description="Compare a segmentation network's predictions with train-mode and eval-mode "
        "normalization, tile by tile, over volumes larger than memory.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_parser(sub)
    add_recalibrate_parser(sub)
    add_fold_parser(sub)
    add_demo_parser(sub)
    add_inspect_parser(sub)
    add_sweep_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for a user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a stopped run says how to resume
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _show_warning
            return int(args.handler(args) or 0)
    except NormcheckError as error:
        if args.debug:
            raise
        print(f"napari-normcheck: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from napari_normcheck.cli.run import stopped_message

        print(f"napari-normcheck: {stopped_message(args, None)}", file=sys.stderr)
        return 130


_show_other_warning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # The core's notices (a lock taken over, ...) are one line, without file and line number.
    if issubclass(category, NormcheckNotice):
        print(f"napari-normcheck: note: {message}", file=sys.stderr)
    else:
        _show_other_warning(message, category, filename, lineno, file, line)
