"""The `onnx-lowrank` command: compress and inspect.

Exit codes: 0 written (and within the bound), 1 the bound cannot be met (nothing written),
2 bad input or usage (one line on stderr), 3 an internal error (a bug; one line naming where it failed,
the traceback with ONNX_LOWRANK_DEBUG=1).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console

from ..api import compress_file
from ..errors import BoundNotMet, InputError
from ..factorize.registry import METHODS
from ..graph.adapters import ADAPTERS
from ..graph.model_io import check_output_path, write_text
from ..observe.sessions import PROVIDERS
from ..options import Options, parse_list
from ..run.inspection import inspect
from ..run.progress import terminal_progress
from ..system.installation import install_hint, version
from .html import render_html
from .terminal import print_compress, print_inspect

PROG = "onnx-lowrank"
REPORT_ASK = "please report it with the command and ONNX_LOWRANK_DEBUG=1 output"

OFF_TERMINAL_COLUMNS = 100  # the width of what is written to a file or a pipe, unless COLUMNS says otherwise
COMPRESS_EXAMPLES = f"""\
examples:
  {PROG} compress models/digits_cnn.onnx -o digits.lowrank.onnx \\
      --calib models/digits_calib.npz --labels models/digits_calib_labels.npy \\
      --metric accuracy
  {PROG} compress models/minilm_l2.onnx -o minilm_l2.lowrank.onnx \\
      --calib models/minilm_sentences.npz --metric cosine --tolerance 0.01

exit codes:
  0  the model was written (validated within --tolerance when --calib was given)
  1  the bound cannot be met: nothing written (--report, --html say how close)
  2  bad input or usage: one line on stderr naming the problem
  3  an internal error (a bug in {PROG}): one line; please report it
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2, like every other bad input."""

    def error(self, message: str):
        raise InputError(message)


def columns() -> int | None:
    """The width to lay text out for: COLUMNS where it is set (on a terminal or not), else the terminal's
    own (None) on a terminal, else OFF_TERMINAL_COLUMNS."""
    given = os.environ.get("COLUMNS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    return None if sys.stdout.isatty() else OFF_TERMINAL_COLUMNS


def _formatter(base: type[argparse.HelpFormatter]) -> Any:
    """argparse's `base` formatter at the width of `columns()` (argparse leaves two columns free)."""
    width = columns()

    def formatter(*, prog: str) -> argparse.HelpFormatter:
        return base(prog, width=None if width is None else max(width - 2, 20))
    return formatter


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Factorize the weights of an ONNX model into low-rank chains.",
                     epilog=f"{PROG} COMMAND --help: the options of a command",
                     formatter_class=_formatter(argparse.HelpFormatter))
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, title="commands",
                                     metavar="COMMAND")

    run = commands.add_parser("compress", help="write a model with factorized layers",
                              description="Write a model with factorized layers, validated on --calib when given.",
                              epilog=COMPRESS_EXAMPLES,
                              formatter_class=_formatter(argparse.RawDescriptionHelpFormatter))
    run.add_argument("input", type=Path, help="the ONNX model (never modified)")
    run.add_argument("-o", "--output", type=Path, required=True, help="where to write the new model")
    run.add_argument("--calib", type=Path, metavar="PATH",
                     help=".npz of stacked samples (one array per graph input, axis 0 = samples) or a folder of .npz feeds")
    run.add_argument("--labels", type=Path, metavar="PATH", help=".npy of one label per calibration sample (accuracy; perplexity needs none)")
    _option_flags(run)
    run.add_argument("--html", type=Path, metavar="FILE.html",
                     help="write a standalone HTML report with plots (pip install 'onnx-lowrank[html]')")
    run.add_argument("--report", type=Path, metavar="FILE.json", help="write the machine-readable report here")
    run.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")

    look = commands.add_parser("inspect", help="per-layer table: shapes, parameters, spectrum, break-even rank",
                               formatter_class=_formatter(argparse.HelpFormatter))
    look.add_argument("input", type=Path, help="the ONNX model")
    look.add_argument("--ops", default=",".join(ADAPTERS), metavar="LIST", help="comma-separated op types")
    look.add_argument("--calib", type=Path, metavar="PATH",
                      help="calibration data: spectra of the layers' outputs on it instead of the weights'")
    look.add_argument("--provider", choices=PROVIDERS, default="cpu", help="execution provider for --calib")
    look.add_argument("--method", choices=METHODS, default="auto", metavar="METHOD",
                      help="the decompositions whose error at half size is shown: %(choices)s (auto: every one "
                           "that applies; svd: the quickest)")
    return parser


def _option_flags(run: argparse.ArgumentParser) -> None:
    """One flag per field of Options that declares one (options.Flag), in the fields' order."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for option in dataclasses.fields(Options):
        flag = option.metadata.get("flag")
        if flag is None:
            continue
        if flag.exclusive is not None and flag.exclusive not in groups:
            groups[flag.exclusive] = run.add_mutually_exclusive_group()
        target = run if flag.exclusive is None else groups[flag.exclusive]
        name = "--" + option.name.replace("_", "-")
        if option.default is False:
            target.add_argument(name, action="store_true", help=flag.help)
        else:
            default = None if option.default is dataclasses.MISSING else option.default
            target.add_argument(name, type=flag.type, choices=flag.choices, metavar=flag.metavar, default=default,
                                help=flag.help)


def _options(args: argparse.Namespace) -> dict:
    """The Options fields given on the command line (converted as their flags say)."""
    given = {}
    for option in dataclasses.fields(Options):
        flag = option.metadata.get("flag")
        value = None if flag is None else getattr(args, option.name)
        if flag is not None and value is not None:
            given[option.name] = value if flag.convert is None else flag.convert(value)
    return given


def _compress(args: argparse.Namespace, console: Console) -> int:
    for flag, path in (("--report", args.report), ("--html", args.html)):
        if path is not None:
            check_output_path(path, args.input)
            if path.resolve() == args.output.resolve():
                raise InputError(f"{flag} {path} is the output model; choose another path")
    if args.report is not None and args.html is not None and args.report.resolve() == args.html.resolve():
        raise InputError("--report and --html name the same file; choose two paths")
    if args.html is not None and importlib.util.find_spec("matplotlib") is None:
        raise InputError(f"--html needs matplotlib: {install_hint('html')}")
    try:
        report = compress_file(args.input, args.output, calibration=args.calib, labels=args.labels,
                               progress=terminal_progress(args.quiet), **_options(args))
    except BoundNotMet as failure:
        _write_reports(args, failure.report)
        if not args.quiet:
            print_compress(failure.report, console, written=False)
        raise
    _write_reports(args, report)
    if not args.quiet:
        print_compress(report, console, written=True, output=args.output)
    return 0


def _write_reports(args: argparse.Namespace, report) -> None:
    if args.report is not None:
        write_text(args.report, report.to_json())
    if args.html is not None:
        write_text(args.html, render_html(report))


def _inspect(args: argparse.Namespace, console: Console) -> int:
    rows = inspect(args.input, ops=parse_list(args.ops), calibration=args.calib, provider=args.provider, method=args.method)
    print_inspect(rows, console, data=args.calib is not None)
    return 0


def _warn(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (e.g. CUDA asked for but missing) as one line on stderr."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _where(error: BaseException) -> str:
    """What failed: the innermost onnx-lowrank function the error passed through, and the library that
    raised it when that is not onnx-lowrank or the standard library (e.g. onnxruntime, numpy)."""
    ours, raiser = PROG, None
    traceback = error.__traceback__
    while traceback is not None:
        frame = traceback.tb_frame
        module = frame.f_globals.get("__name__", "")
        top = module.partition(".")[0]
        if top == __name__.partition(".")[0]:
            ours, raiser = f"{module}.{frame.f_code.co_qualname}", None
        elif top and top not in sys.stdlib_module_names and raiser is None:
            raiser = top
        traceback = traceback.tb_next
    return ours if raiser is None else f"{ours} (raised by {raiser})"


def main(argv: list[str] | None = None) -> int:
    console = Console(width=columns())
    warnings.showwarning = _warn
    try:
        parser = _parser()
        argv = sys.argv[1:] if argv is None else list(argv)
        if not argv:  # a bare `onnx-lowrank`: what it can do rather than a missing-argument line
            print(parser.format_help(), end="", file=sys.stderr)
            return 2
        try:
            args = parser.parse_args(argv)
        except SystemExit as done:  # --help and --version printed what was asked
            return done.code if isinstance(done.code, int) else 0
        return _compress(args, console) if args.command == "compress" else _inspect(args, console)
    except InputError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except BoundNotMet as error:
        print(f"{PROG}: bound not met, nothing written: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug: still one line unless asked for the traceback
        if os.environ.get("ONNX_LOWRANK_DEBUG"):
            raise
        first_line = (str(error).strip().splitlines() or [""])[0]
        print(f"{PROG}: internal error in {_where(error)}: {type(error).__name__}: {first_line}; {REPORT_ASK}",
              file=sys.stderr)
        return 3
