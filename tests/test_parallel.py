"""The per-layer work on other executors: worker processes (`jobs`) and a Dask cluster (`scheduler`).

Each layer is factorized detached from the graph, so wherever it runs the result is the same: the same
model bytes, the same ranks and the same validated error as the inline run. A LocalCluster on loopback
stands in for a real cluster; the pool threshold is lowered so that the small digits CNN uses the pool.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import onnx_lowrank
from onnx_lowrank.run import stages as pipeline
from onnx_lowrank.system import parallel

MODELS = Path(__file__).resolve().parents[1] / "models"
DIGITS = MODELS / "digits_cnn.onnx"
CALIB = MODELS / "digits_calib.npz"
OPTIONS = {"calibration": CALIB, "target_params": 0.4, "method": "svd", "objective": "size"}


@pytest.fixture(scope="module")
def inline():
    return onnx_lowrank.compress(DIGITS, jobs=1, **OPTIONS)


def _same(first, second) -> None:
    (model_a, report_a), (model_b, report_b) = first, second
    assert [(l.node, l.method, l.rank) for l in report_a.layers] == [(l.node, l.method, l.rank) for l in report_b.layers]
    assert report_a.validation.value == report_b.validation.value
    assert model_a.SerializeToString() == model_b.SerializeToString()


def test_process_pool_gives_the_inline_result(inline, monkeypatch):
    monkeypatch.setattr(parallel, "POOL_MIN_PARAMS", 0)
    _same(inline, onnx_lowrank.compress(DIGITS, jobs=2, **OPTIONS))


def test_dask_local_cluster_gives_the_inline_result(inline):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        _same(inline, onnx_lowrank.compress(DIGITS, scheduler=cluster.scheduler_address, **OPTIONS))


@pytest.mark.parametrize("jobs", [0, -2, 1.5, True])
def test_bad_jobs(jobs):
    with pytest.raises(onnx_lowrank.InputError, match="jobs must be a positive integer"):
        onnx_lowrank.compress(DIGITS, jobs=jobs, target_params=0.5)


def test_unreachable_scheduler_is_bad_input(monkeypatch):
    pytest.importorskip("distributed")
    monkeypatch.setattr(parallel, "DASK_CONNECT_TIMEOUT", "2s")
    with pytest.raises(onnx_lowrank.InputError, match=r"cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        onnx_lowrank.compress(DIGITS, scheduler="tcp://127.0.0.1:9", **OPTIONS)


def test_decompositions_parked_on_disk_give_the_same_model(monkeypatch):
    """Large models keep each layer's decompositions in files while ranks are chosen (parking.py); every
    method's decomposer (data-aware SVD, Tucker-2, CP, ...) answers the same from there."""
    for method in ("auto", "tucker2"):  # auto picks data-aware SVDs here; a conv method's chain too
        options = {"calibration": CALIB, "target_params": 0.4, "method": method, "objective": "size", "jobs": 1,
                   "refit": "none"}  # the refit reads the factors parked or not alike (test_refit.py: the refit)
        in_memory = onnx_lowrank.compress(DIGITS, **options)
        with monkeypatch.context() as patched:
            patched.setattr(pipeline, "PARK_MIN_PARAMS", 0)
            parked = onnx_lowrank.compress(DIGITS, **options)
        assert parked[1].layers
        _same(in_memory, parked)


def test_default_pool_only_where_it_pays():
    """Without `jobs`, data-aware SVDs (pool_pays False) run inline; an explicit `jobs` still gets its pool."""
    large = parallel.POOL_MIN_PARAMS
    with parallel.executor_for(None, None, large, pool_pays=False) as workers:
        assert workers is None
    with parallel.executor_for(2, None, large, pool_pays=False) as workers:
        assert workers is not None and workers.slots == 4
    with parallel.executor_for(None, None, large - 1, pool_pays=True) as workers:
        assert workers is None
    if parallel.default_jobs() > 1:
        with parallel.executor_for(None, None, large, pool_pays=True) as workers:
            assert workers is not None


def test_worker_processes_from_a_script_without_a_main_guard(tmp_path):
    """A plain script (no `if __name__ == "__main__":`) whose call starts worker processes: spawn must not
    run the script again in each worker (multiprocessing refuses that, and the pool breaks)."""
    script = tmp_path / "plain.py"
    script.write_text(
        "import onnx_lowrank\n"
        "from onnx_lowrank.system import parallel\n"
        "parallel.POOL_MIN_PARAMS = 0\n"
        "print('started')\n"
        f"model, report = onnx_lowrank.compress({str(DIGITS)!r}, target_params=0.7, method='tucker2', jobs=2)\n"
        "print('kept', report.params_after)\n", encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(MODELS.parent), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("started") == 1 and "kept" in done.stdout


def test_default_pool_pays_for_conv_methods_and_the_largest_weight_only_svds():
    assert parallel.pool_pays(False, True, parallel.POOL_MIN_PARAMS)
    assert not parallel.pool_pays(True, False, 100_000_000)  # measured: inline twice as fast on 2 cores
    assert parallel.pool_pays(True, False, parallel.SVD_POOL_MIN_PARAMS)
    assert not parallel.pool_pays(False, False, 10 ** 9)  # data-aware SVDs of matrices
