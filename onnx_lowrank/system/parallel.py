"""Where the per-layer work runs: inline, a local process pool (`jobs`), or a Dask cluster (`scheduler`).

Every layer's factorization is independent of the others and a pure function of its (detached) weight
and statistics, so any `concurrent.futures.Executor` can run it and the results are the same wherever
they were computed. Small models run inline: starting worker processes costs more than they save.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import sys
import types
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing.context import SpawnContext, SpawnProcess
from typing import Any

from threadpoolctl import ThreadpoolController

from ..errors import InputError
from .installation import install_hint

BLAS_THREADS_MIN_PARAMS = 1_000_000
POOL_MIN_PARAMS = 4_000_000  # below this many factorizable parameters the work runs in this process
# ... and, without --jobs, weight-only SVDs of matrices below this many: LAPACK's SVD uses every core already
# (2 cores, random-weight transformer blocks, factorize phase inline / two workers: 12.6M parameters 2.5 s /
# 15 s, 25M 5.0 s / 10 s, 101M 29 s / 71 s; 554M 176 s / 135 s)
SVD_POOL_MIN_PARAMS = 200_000_000
DASK_CONNECT_TIMEOUT = "20s"


def blas_threads(params: int):
    """One BLAS thread for the work on a layer below BLAS_THREADS_MIN_PARAMS: its many small calls (CP's
    least squares above all) run an order of magnitude slower multi-threaded (measured: 0.9 s against
    15 s for one parafac on a 64x64x3x3 kernel with 2 OpenBLAS threads beside onnxruntime's); large SVDs
    gain from threads."""
    return _blas().limit(limits=1 if params < BLAS_THREADS_MIN_PARAMS else None)


def one_blas_thread():
    """One BLAS thread, whatever the size (work made of many matrix-vector steps)."""
    return _blas().limit(limits=1)


@functools.cache
def _blas() -> ThreadpoolController:
    """The thread pools of the BLAS libraries loaded, found once: threadpool_limits() finds them anew on
    every call by scanning every shared object of the process (profiled: 3.6 s of a 57 s PP-OCR lossless
    run, one call per layer factorization)."""
    return ThreadpoolController()


def default_jobs() -> int:
    """All the cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_jobs(jobs: int | None) -> None:
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise InputError(f"jobs must be a positive integer, got {jobs!r}")


@dataclass
class Workers:
    """An executor and how many tasks to keep in flight on it."""

    executor: Executor
    slots: int

    def map(self, function: Callable, *iterables: Iterable, each: Callable[[Any], None]) -> None:
        """executor.map, handing each result to `each` in order, with at most `slots` tasks submitted at a
        time: each task carries a layer's weight and statistics, and submitting all at once would hold
        (or, to a cluster, send through its scheduler) every layer of the model at once."""
        pending: collections.deque = collections.deque()
        for arguments in zip(*iterables):
            pending.append(self.executor.submit(function, *arguments))
            if len(pending) >= self.slots:
                each(pending.popleft().result())
        while pending:
            each(pending.popleft().result())


def pool_pays(weight_only: bool, conv_methods: bool, params: int, blocks: bool = False) -> bool:
    """Whether a default pool (no `jobs`) pays: for Conv decompositions (Tucker, CP: many small
    single-threaded calls), for int4 blocks (`blocks`: GPTQ rounds column by column, single-threaded),
    and for weight-only SVDs of the largest models alone (SVD_POOL_MIN_PARAMS)."""
    return conv_methods or blocks or (weight_only and params >= SVD_POOL_MIN_PARAMS)


@contextlib.contextmanager
def executor_for(jobs: int | None, scheduler: str | None, params: int, pool_pays: bool = True
                 ) -> Iterator[Workers | None]:
    """Workers for the per-layer work (None: run inline). A `scheduler` address sends it to that Dask
    cluster; otherwise `jobs` worker processes when the model is large enough. Without `jobs`: all cores
    where `pool_pays` (the function of that name), else inline. A pool pays for the weight-only SVDs of the
    largest models (a 2 GB synthetic transformer: 176 s inline, 135 s on two workers) and Conv
    decompositions (Tucker, CP: many small single-threaded calls). It does not for data-aware SVDs of matrices: BLAS-3 products and eigenproblems that use every core
    here already, while each layer's covariance must be sent to a worker (BERT-base's factorizations:
    30 s inline, 49-58 s on two workers; MiniLM-L6's: 4.5 s against 7 s)."""
    if scheduler is not None:
        with _dask_executor(scheduler) as workers:
            yield workers
        return
    count = (default_jobs() if pool_pays else 1) if jobs is None else jobs
    if count <= 1 or params < POOL_MIN_PARAMS:
        yield None
        return
    with ProcessPoolExecutor(max_workers=count, mp_context=_SPAWN_WITHOUT_MAIN) as pool:
        yield Workers(pool, 2 * count)


class _ProcessWithoutMain(SpawnProcess):
    """A spawned worker that does not run the caller's main module.

    Spawn (not fork: the parent holds ONNX Runtime thread pools, which forked children must not
    inherit) starts a fresh interpreter, and multiprocessing has it re-import `__main__` (as
    `__mp_main__`, from the parent main module's `__file__` or `__spec__`) so that functions defined
    there can be unpickled. A plain script without an `if __name__ == "__main__":` guard would then
    run its own `compress(...)` again in every worker, which multiprocessing refuses with a
    RuntimeError (and the pool breaks). The workers here only run onnx_lowrank's own functions, so
    they need nothing from `__main__`: while a worker is launched (the preparation data is taken then,
    in this thread), `sys.modules["__main__"]` is a blank module, and the child imports nothing of the
    caller's. So a library call works from a script, a `python -m` module, a notebook or an
    interactive session alike, guard or no guard."""

    @staticmethod
    def _Popen(process_obj):
        with _main_hidden():
            return SpawnProcess._Popen(process_obj)


class _SpawnWithoutMain(SpawnContext):
    Process = _ProcessWithoutMain


_SPAWN_WITHOUT_MAIN = _SpawnWithoutMain()


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """`sys.modules["__main__"]` is a blank module (no `__file__`, no `__spec__`) inside the block."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


@contextlib.contextmanager
def _dask_executor(address: str) -> Iterator[Workers]:
    try:
        from distributed import Client
    except ImportError:
        raise InputError(f"--scheduler needs Dask's distributed: {install_hint('dask')}") from None
    try:
        client = Client(address, timeout=DASK_CONNECT_TIMEOUT, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(f"cannot reach the Dask scheduler at {address}: {first_line}") from None
    try:
        threads = sum(client.nthreads().values()) or 1
        yield Workers(client.get_executor(pure=False), 2 * threads)
    finally:
        client.close()
