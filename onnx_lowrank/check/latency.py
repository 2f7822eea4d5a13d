"""Latency on the execution provider validation runs on, as deployed (ONNX Runtime with every graph
optimization on, the given intra-op thread count).

Low-rank chains cut multiply-adds, yet two small GEMMs can run slower than one larger one (less work per
call, another kernel launch, a lost MatMul+Add fusion). `time_side_by_side` times models on one feed in
interleaved rounds (the order alternates every round, so drift of a shared, busy machine hits all of them
alike): one layer dense against factorized (layer_timer.py), or (`end_to_end`, for the report) the original
against the compressed model.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from ..observe.sessions import EXECUTION_PROVIDERS, open_session
from ..report import Latency, Timing

WARMUP = 3  # untimed runs of every model before the rounds, ...
WARM_AFTER_SECONDS = 0.5  # ... fewer for a model one of whose warm-up runs took this long (BERT-base: 3 s a run)
MIN_RUNS = 10  # timed runs of every model, at least ...
MIN_SECONDS = 1.0  # ... and rounds for at least this long in all (end to end), ...
MAX_SECONDS = 15.0  # ... but slow models (BERT-base at batch 16: 3 s a run) stop after this long
FEW_RUNS = 5  # stopping after the longest allowed time needs this many runs of every model


# --------------------------------------------------------------------------------------------- timing


def timing_session(model: onnx.ModelProto, provider: str, threads: int = 0) -> ort.InferenceSession:
    """A session as models are deployed: every graph optimization on (fusions, constant folding),
    `threads` intra-op threads (0: ONNX Runtime's default), CUDA first when `provider` is "cuda"."""
    return open_session(model, provider, threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)


class _Runner:
    """One model's session with its feed bound: each call is one timed inference (seconds).

    On CUDA the inputs live on the device and the outputs stay there (IOBinding), so what is timed is
    the model, not host-device copies that are the same for every model compared."""

    def __init__(self, model: onnx.ModelProto, feed: Mapping[str, np.ndarray], provider: str, threads: int):
        self.session = timing_session(model, provider, threads)
        self.cuda = self.session.get_providers()[0] == EXECUTION_PROVIDERS["cuda"]
        if provider == "cuda" and not self.cuda:
            warnings.warn("the CUDA execution provider failed to start; timing on the CPU", RuntimeWarning, stacklevel=3)
        names = [i.name for i in self.session.get_inputs()]
        missing = [name for name in names if name not in feed]
        if missing:
            raise ValueError(f"the feed has no value for model input {missing[0]!r}")
        self.feed = {name: feed[name] for name in names}
        self.outputs = [o.name for o in self.session.get_outputs()]
        if self.cuda:
            self.binding = self.session.io_binding()
            self.on_device = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), "cuda", 0)
                              for name, value in self.feed.items()}  # kept alive as long as the binding
            for name, value in self.on_device.items():
                self.binding.bind_ortvalue_input(name, value)
            for name in self.outputs:
                self.binding.bind_output(name, "cuda")

    def __call__(self) -> float:
        if self.cuda:
            start = time.perf_counter()
            self.session.run_with_iobinding(self.binding)  # synchronizes the device before returning
            return time.perf_counter() - start
        start = time.perf_counter()
        self.session.run(self.outputs, self.feed)
        return time.perf_counter() - start


def time_side_by_side(
    models: Sequence[onnx.ModelProto],
    feed: Mapping[str, np.ndarray],
    provider: str,
    threads: int = 0,
    warmup: int = WARMUP,
    min_runs: int = MIN_RUNS,
    min_seconds: float = MIN_SECONDS,
    advance: Callable[[int], None] | None = None,
    max_seconds: float | None = None,
) -> list[Timing]:
    """Latency of each model on `feed` (each takes the inputs it declares), one Timing per model.

    All sessions are opened first (as deployed: see `timing_session`), each model runs `warmup` times,
    then rounds run every model once, in an order reversed every round (ABBA...: a drift of the machine's
    speed hits all models alike), until every model ran `min_runs` times and the rounds took
    `min_seconds` in all, or, with `max_seconds`, until the rounds took that long and every model ran
    FEW_RUNS times. A model is warm after a warm-up run of WARM_AFTER_SECONDS. `advance` is called
    once per round (a progress bar). Never compare timings taken on different machines or thread counts.
    """
    if min_runs < 1:
        raise ValueError(f"min_runs must be at least 1, got {min_runs}")
    runners = [_Runner(model, feed, provider, threads) for model in models]
    return _rounds(runners, warmup, min_runs, min_seconds, advance, max_seconds)


def _rounds(runners: list[_Runner], warmup: int, min_runs: int, min_seconds: float, advance,
            max_seconds: float | None = None) -> list[Timing]:
    for runner in runners:
        for _ in range(warmup):
            if runner() >= WARM_AFTER_SECONDS:
                break
    seconds: list[list[float]] = [[] for _ in runners]
    order = list(range(len(runners)))
    rounds, start = 0, time.perf_counter()
    while rounds < min_runs or time.perf_counter() - start < min_seconds:
        if max_seconds is not None and rounds >= min(FEW_RUNS, min_runs) and time.perf_counter() - start >= max_seconds:
            break
        for position in order if rounds % 2 == 0 else reversed(order):
            seconds[position].append(runners[position]())
        rounds += 1
        if advance is not None:
            advance(1)
    return [Timing.of(values) for values in seconds]


_ORT_ERRORS = tuple(value for value in vars(ort.capi.onnxruntime_pybind11_state).values()
                    if isinstance(value, type) and issubclass(value, Exception))


def end_to_end(
    original: onnx.ModelProto,
    factorized: onnx.ModelProto,
    quantized: onnx.ModelProto | None,
    feed: Mapping[str, np.ndarray],
    provider: str,
    advance: Callable[[int], None] | None = None,
    threads: int = 0,
    min_runs: int = MIN_RUNS,
    min_seconds: float = MIN_SECONDS,
) -> Latency:
    """The report's end-to-end latency: the original and the compressed model (the quantized one when
    given, else the factorized one; both when quantized) timed side by side on one feed.

    `provider` is the one that ran, `batch` the feed's first axis, `threads` None for onnxruntime's
    default; `original` / `compressed` [/ `factorized`] their Timings, `speedup` median original / median
    compressed. Should onnxruntime fail to run a model with every optimization on, `error` says so
    instead of failing the run that produced a validated model.
    """
    first = next(iter(feed.values()), None)
    batch = int(np.shape(first)[0]) if first is not None and np.ndim(first) else None
    models = {"original": original, "compressed": quantized if quantized is not None else factorized}
    if quantized is not None:
        models["factorized"] = factorized
    try:
        runners = [_Runner(model, feed, provider, threads) for model in models.values()]
        timings = _rounds(runners, WARMUP, min_runs, min_seconds, advance, MAX_SECONDS)
    except _ORT_ERRORS as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return Latency(provider, batch, threads or None,
                       error=f"onnxruntime could not time the models with every optimization on: {first_line}")
    timed = dict(zip(models, timings))
    return Latency(
        provider="cuda" if all(runner.cuda for runner in runners) else "cpu", batch=batch, threads=threads or None,
        runs=timings[0].runs, original=timed["original"], compressed=timed["compressed"],
        factorized=timed.get("factorized"), speedup=timings[0].median_ms / timings[1].median_ms,
    )
