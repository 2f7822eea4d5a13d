"""`Options`: how to compress, one typed field per choice. Each field's metadata carries its command-line
flag (help, choices, metavar), so that the `compress` command's flags are generated from here (cli.py):
adding an option touches this file only.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .check.metrics import DEFAULT_METRIC, DEFAULT_TOLERANCE, METRICS, check_metric
from .choose.objective import DEFAULT_OBJECTIVE, OBJECTIVES
from .choose.ranks_file import load_ranks_file, validate_ranks
from .errors import InputError
from .factorize.int4 import BLOCK_SIZES
from .factorize.refit import REFITS
from .factorize.registry import METHODS
from .graph.adapters import ADAPTERS
from .observe.sessions import PROVIDERS
from .quantize.int8 import INT8_RANGES, QUANTIZATIONS
from .system.installation import install_hint
from .system.parallel import check_jobs

TIES = ("exempt", "count")
ACCEPTS = ("value", "bound")


@dataclass(frozen=True)
class Flag:
    """How an `Options` field is given on the command line (--field-name)."""

    help: str
    metavar: str | None = None
    choices: Sequence[str] | None = None
    type: Callable[[str], object] | None = None  # argparse's conversion of the text
    convert: Callable[[Any], object] | None = None  # then, for a value given, what the field holds
    exclusive: str | None = None  # flags with the same group name exclude each other


def _option(default, flag: Flag | None = None, factory: Callable[[], object] | None = None):
    metadata = {} if flag is None else {"flag": flag}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def parse_list(text: object) -> tuple[str, ...]:
    """A comma-separated list (--ops, --outputs), blanks dropped."""
    return tuple(op.strip() for op in str(text).split(",") if op.strip())


def _tolerance_defaults() -> str:
    return ", ".join(f"{metric} {value:g}" for metric, value in DEFAULT_TOLERANCE.items())


@dataclass(frozen=True)
class Options:
    """How to compress. At most one of `ranks`, `target_params`, `target_bytes`, `energy`; with none,
    calibration data is needed and compact mode finds the fewest parameters within `tolerance`."""

    ranks: Mapping[str, int | str] | None = _option(None, Flag(  # {"node or weight name" | "*": int | "full"}
        'a .json file of ranks per node or weight name: {"name" | "*": int | "full"}', "FILE", type=Path,
        convert=load_ranks_file, exclusive="rank"))
    target_params: float | None = _option(None, Flag(  # keep this fraction of the factorizable parameters
        "keep this fraction of the factorizable parameters, spent where it loses least energy", "F", type=float,
        exclusive="rank"))
    target_bytes: float | None = _option(None, Flag(  # keep this fraction of the file's bytes (allocation.py)
        "keep this fraction of the model file's bytes, the factorizable weights' spent where they lose least "
        "(with --quantize int4, 4-bit layers count their bytes)", "F", type=float))  # one of the rank group:
    # __post_init__ says so (in argparse's group its usage line would not fit 80 columns)
    energy: float | None = _option(None, Flag(
        "per layer, the smallest rank keeping this fraction of the singular-value energy", "E", type=float,
        exclusive="rank"))
    tolerance: float | None = _option(None, Flag(  # bound on the validated error (compact: default per metric)
        "max validated error on the held-out calibration part, in --metric (compact-mode default per metric: "
        f"{_tolerance_defaults()})", "T", type=float))
    metric: str = _option(DEFAULT_METRIC, Flag("error measure: %(choices)s (default %(default)s)", "M",
                                                choices=METRICS))
    method: str = _option("auto", Flag("decomposition: %(choices)s (auto: the best available)", "METHOD",
                                       choices=METHODS))
    no_data: bool = _option(False, Flag("factorize from the weights alone (still validate on --calib)"))
    ops: Sequence[str] = _option(None, Flag(
        f"comma-separated op types to consider (default {','.join(ADAPTERS)})", "LIST", convert=parse_list),
        factory=lambda: tuple(ADAPTERS))
    outputs: Sequence[str] | None = _option(None, Flag(  # the graph outputs the metric compares (None: its default)
        "comma-separated graph outputs the metric compares, e.g. the one a deployment reads (default: every "
        "one; perplexity: the first, the logits)", "LIST", convert=parse_list))
    provider: str = _option("cpu", Flag("execution provider for validation", choices=PROVIDERS))  # cpu|cuda|auto
    allow_larger: bool = _option(False, Flag("keep factorizations that do not shrink a layer"))
    seed: int = _option(0, Flag("seed of the fit / validation split", type=int))
    batch_size: int = _option(8, Flag("calibration samples per ONNX Runtime run", type=int))
    jobs: int | None = _option(None, Flag(  # worker processes for the per-layer work (None: by model size)
        "worker processes for the per-layer factorizations (default: all cores for Conv decompositions and for "
        "weight-only SVDs of models over 200M factorizable parameters; anything else runs in one process)", "N",
        type=int))
    scheduler: str | None = _option(None, Flag(
        "send the per-layer factorizations to this Dask scheduler (tcp://host:8786) instead", "ADDRESS"))
    cache: str | os.PathLike | None = _option(None, Flag(  # statistics and sensitivities kept between runs
        "keep calibration statistics and sensitivities here, keyed by model and data: a second run (another "
        "tolerance or budget) skips those passes", "DIR", type=Path))
    objective: str = _option(DEFAULT_OBJECTIVE, Flag(  # size | latency | balanced: see objective.py
        "size: fewest parameters; balanced: ranks in hardware-friendly multiples and no factorization slower "
        "than its dense layer on --provider (measured); latency: only factorizations measurably faster "
        "(default %(default)s)", choices=OBJECTIVES))
    quantize: str | None = _option(None, Flag(  # also quantize, validated together
        "also quantize the weights (int8: dynamic for MatMul/Gemm/Gather, static QDQ with the calibration data "
        "for Conv; int4: MatMul, Gemm and embedding weights in 4-bit blocks with a low-rank correction fitted "
        "to the calibration data, or 8-bit blocks, offered beside each layer's factorizations and chosen by the "
        "same search); the combined model is validated against the bound", choices=QUANTIZATIONS))
    block_size: int | None = _option(None, Flag(  # int4.py
        f"--quantize int4: weights per block, {' | '.join(map(str, BLOCK_SIZES))} (default: each layer's "
        "chosen by the search among them)", "N", type=int))
    int8_range: str = _option("auto", Flag(  # reduced range where the CPU lacks VNNI (quantize.py)
        "int8 value range: full needs a CPU with VNNI (or AMX, or ARM dot-product) to be exact; reduced (7 bits) "
        "is right on every CPU; auto picks by this CPU (default %(default)s)", choices=INT8_RANGES))
    refit: str = _option("auto", Flag(  # refit.py
        "solve factorized layers again, in graph order, for the inputs the compressed layers before them "
        "produce (needs --calib; one ONNX Runtime pass per stage of layers): auto refits ranks fixed before "
        "validation (--target-params, --ranks, --energy) and keeps the refit when it validates better; "
        "sequential refits every candidate the search validates, so compact mode may go smaller, at that "
        "cost (default %(default)s)", choices=REFITS))
    ties: str | None = _option(None, Flag(  # top1 / accuracy: near-ties of the original (generalization.py)
        "top1 / accuracy: whether decisions the original makes by a near-tie margin (any change may flip them) "
        "count against the tolerance like the others or are exempt from it (default: exempt at tolerance 0, "
        "lossless; count for a positive tolerance)", choices=TIES))
    accept: str = _option("value", Flag(  # what must be within the tolerance for a candidate to be accepted
        "what must be within the tolerance: value, the error on the held-out samples; or bound, that and the "
        "upper confidence bound for new inputs (at --confidence; not for max-abs) (default %(default)s)",
        choices=ACCEPTS))
    confidence: float = _option(0.95, Flag(  # of the bound promised for new inputs (generalization.py)
        "confidence of the bound reported for new inputs (default %(default)s)", "C", type=float))
    progress: bool = False  # progress bars on stderr (the command line turns them on in a terminal)

    def __post_init__(self) -> None:
        given = [name for name in ("ranks", "target_params", "target_bytes", "energy") if getattr(self, name) is not None]
        if len(given) > 1:
            raise InputError("choose ranks with only one of --ranks, --target-params, --target-bytes or --energy")
        if self.ranks is not None:
            object.__setattr__(self, "ranks", validate_ranks(self.ranks))
        _check_fraction("target-params", self.target_params)
        _check_fraction("target-bytes", self.target_bytes)
        _check_fraction("energy", self.energy)
        self._check_tolerance()
        self._check_methods()
        _check_choice("op type", self.ops, ADAPTERS, " in ops; choose from")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError(f"batch size must be a positive integer, got {self.batch_size!r}")
        check_jobs(self.jobs)
        if self.scheduler is not None and (not isinstance(self.scheduler, str) or not self.scheduler):
            raise InputError(f"scheduler must be an address such as tcp://host:8786, got {self.scheduler!r}")
        _check_choice("objective", [self.objective], OBJECTIVES)
        if self.quantize not in (None, *QUANTIZATIONS):
            raise InputError(f"unknown quantization {self.quantize!r}; choose {', '.join(QUANTIZATIONS)}")
        _check_choice("int8 range", [self.int8_range], INT8_RANGES)
        self._check_block_size()
        _check_choice("refit", [self.refit], REFITS)
        if isinstance(self.confidence, bool) or not isinstance(self.confidence, (int, float)) \
                or not 0.5 <= self.confidence < 1:
            raise InputError(f"confidence must be a number in [0.5, 1), got {self.confidence!r}")
        _check_choice("provider", [self.provider], PROVIDERS)
        self._check_acceptance()

    def _check_block_size(self) -> None:
        if self.block_size is None:
            return
        if self.quantize != "int4":
            raise InputError("--block-size applies to --quantize int4 only")
        if isinstance(self.block_size, bool) or self.block_size not in BLOCK_SIZES:
            raise InputError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block_size!r}")

    @property
    def int4_blocks(self) -> tuple[int, ...] | None:
        """The block sizes on offer when int4 is asked for (None otherwise)."""
        return None if self.quantize != "int4" else (self.block_size,) if self.block_size else BLOCK_SIZES

    def _check_acceptance(self) -> None:
        """--ties and --accept: known values, and only where they mean something."""
        if self.ties is not None:
            _check_choice("ties", [self.ties], TIES)
        _check_choice("accept", [self.accept], ACCEPTS)
        if self.ties is not None and self.metric not in ("top1", "accuracy"):
            raise InputError(f"--ties applies to the decisions of top1 and accuracy, not to {self.metric}")
        if self.accept != "bound":
            return
        if self.metric == "max-abs":
            raise InputError("--accept bound needs a bound in the metric's units; max-abs has none (its bound is "
                             "the share of new inputs above the maximum seen)")
        if self.tolerance == 0:
            raise InputError("--accept bound needs a positive tolerance: no number of samples bounds a rate at 0")
        if self.tolerance is None and (self.ranks is not None or self.target_params is not None
                                       or self.target_bytes is not None or self.energy is not None):
            raise InputError("--accept bound needs a tolerance to hold the bound within (--tolerance)")

    def _check_tolerance(self) -> None:
        check_metric(self.metric, has_labels=True)
        if self.tolerance is None:
            return
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)):
            raise InputError(f"tolerance must be a number, got {self.tolerance!r}")
        if not math.isfinite(self.tolerance) or self.tolerance < 0 or (self.tolerance == 0 and self.metric != "accuracy"):
            raise InputError(f"tolerance must be a positive number (0 only for accuracy), got {self.tolerance:g}")

    def _check_methods(self) -> None:
        _check_choice("method", [self.method], METHODS)
        if (self.ranks is not None or self.energy is not None) and self.method not in ("auto", "svd"):
            raise InputError(f"--ranks and --energy choose SVD ranks; they do not combine with --method {self.method}")
        if self.method == "cp" and importlib.util.find_spec("tensorly") is None:
            raise InputError(f"method cp needs tensorly: {install_hint('cp')}")


def _check_fraction(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a number in (0, 1], got {value!r}")
    if not 0 < value <= 1:
        raise InputError(f"{name} must be in (0, 1], got {value:g}")


def _check_choice(what: str, given: Sequence[str], allowed: Collection[str], wording: str = "; choose one of") -> None:
    """One line naming the first unknown value (or an empty list) and what is allowed."""
    unknown = [value for value in given if value not in allowed]
    if unknown or not given:
        raise InputError(f"unknown {what} {unknown[0] if unknown else '(none)'!r}{wording} {', '.join(allowed)}")
