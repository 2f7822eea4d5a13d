"""--objective, --quantize, --html and progress bars, end to end on the shipped models.

Timings are never asserted (this machine is shared and noisy); what is asserted is what the objective
promises structurally: ranks on the provider's tile, every kept factorization timed, the end-to-end
latency and ONNX Runtime's fusions reported, the int8 model validated against the same bound.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from rich.console import Console

import onnx_lowrank
import onnx_lowrank.cli.main
from onnx_lowrank.choose.objective import RANK_MULTIPLE
from onnx_lowrank.cli.terminal import print_compress
from onnx_lowrank.errors import BoundNotMet
from onnx_lowrank.factorize.menu import UnitDecomposers, rank_multiple
from onnx_lowrank.factorize.svd import TruncatedSVD

MODELS = Path(__file__).resolve().parents[1] / "models"
MINILM = MODELS / "minilm_l2.onnx"
SENTENCES = MODELS / "minilm_sentences.npz"
DIGITS = MODELS / "digits_cnn.onnx"


def _ranks(report) -> list[int]:
    return [r for layer in report.layers for r in ([layer.rank] if isinstance(layer.rank, int) else layer.rank)]


class _Unit:
    """What UnitDecomposers reads of a unit."""

    def __init__(self, matrices):
        self.matrices = matrices
        self.params = matrices.size


def test_rank_multiple_leaves_only_tiled_ranks_and_says_why_when_none_is_left():
    rng = np.random.default_rng(0)
    wide = UnitDecomposers(_Unit(rng.standard_normal((1, 96, 64))), TruncatedSVD(rng.standard_normal((1, 96, 64))))
    wide.restrict(rank_multiple(16), "no tiled rank")
    assert [o.config for o in wide.options()] == [(16,), (32,), (48,), (64,)]
    assert wide.emptied_by is None
    assert wide.primary_only().options() == wide.options()
    small = UnitDecomposers(_Unit(rng.standard_normal((1, 12, 10))), TruncatedSVD(rng.standard_normal((1, 12, 10))))
    small.restrict(rank_multiple(16), "no tiled rank")
    assert small.options() == [] and small.emptied_by == "no tiled rank"


def test_balanced_without_data_rounds_ranks_and_says_nothing_was_timed():
    _, report = onnx_lowrank.compress(DIGITS, target_params=0.5, method="svd")
    assert report.objective == "balanced" and report.layers
    assert all(rank % RANK_MULTIPLE["cpu"] == 0 for rank in _ranks(report))
    assert any("nothing was timed" in note for note in report.notes)
    assert all(layer.latency is None for layer in report.layers) and report.latency is None
    _, sized = onnx_lowrank.compress(DIGITS, target_params=0.5, method="svd", objective="size")
    assert sized.notes == [] and any(rank % RANK_MULTIPLE["cpu"] for rank in _ranks(sized))


def first_sentences(count: int) -> dict[str, np.ndarray]:
    with np.load(SENTENCES) as data:
        return {name: data[name][:count] for name in data.files}


@pytest.fixture(scope="module")
def int8_compact():
    """MiniLM-L2 in compact mode, balanced objective, int8: one run, checked from several sides. On the first 120
    of the 600 sentences (60 fit, 60 held out): what is checked here does not hang on their count (measured on
    200 against 600: int8 alone 0.0101 against 0.0103), and the statistics and validations are a fifth."""
    model, report = onnx_lowrank.compress(
        MINILM, calibration=first_sentences(120), metric="cosine", tolerance=0.02, quantize="int8", batch_size=32,
        method="svd",  # the objective and int8 are the subject (auto's FFN pruning doubled the run: test_prune.py)
    )
    return model, report


def test_balanced_times_every_kept_factorization_and_the_whole_model(int8_compact):
    _, report = int8_compact
    assert report.layers
    assert all(rank % RANK_MULTIPLE["cpu"] == 0 for rank in _ranks(report))
    for layer in report.layers:
        if layer.method == "prune":  # the same ops on smaller matrices: never timed alone (coupled.COUPLED_METHODS)
            assert layer.latency is None
            continue
        assert layer.latency["dense_ms"] > 0 and layer.latency["factorized_ms"] > 0
    timing = report.latency
    assert timing.provider == "cpu" and timing.batch == 32
    for name in ("original", "compressed", "factorized"):  # factorized: quantized runs report both
        stats = getattr(timing, name)
        assert 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert timing.speedup == pytest.approx(timing.original.median_ms / timing.compressed.median_ms)
    assert report.fusions.unfactorized_match, report.fusions
    assert "latency gate" in report.phases and "latency" in report.phases


def test_int8_is_validated_against_the_same_bound(int8_compact):
    model, report = int8_compact
    onnx.checker.check_model(model, full_check=True)
    quantization = report.quantization
    assert report.validation.passed and report.validation.value <= 0.02
    assert quantization.error_quantized == report.validation.value
    assert quantization.error_quantized_alone is not None and quantization.error_factorized is not None
    assert quantization.bytes_quantized < 0.4 * quantization.bytes_factorized
    assert quantization.nodes["nodes"]["MatMul"] > 0
    # int8 alone (0.006) is within its share of the tolerance (0.6 x 0.02): nothing measured, nothing kept float
    assert quantization.fallback_nodes == [] and quantization.fallback.nodes_measured == 0
    assert quantization.nodes["float"] == {}
    assert report.bytes_after == quantization.bytes_quantized < 0.3 * report.bytes_before
    ops = {node.op_type for node in model.graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear"}


def test_int8_over_its_share_quantizes_the_costliest_nodes_weight_only():
    """Tolerance 0.008: int8 of every node (0.006 on the held-out part) is over its share (0.6 x 0.008), so
    the nodes whose measured cost is highest are quantized weight-only (MatMulNBits) instead, in the written
    model too (their low-rank chains alike), and the whole is validated within the tolerance."""
    calibration = first_sentences(96)  # 48 fit, 48 held out
    model, report = onnx_lowrank.compress(MINILM, calibration=calibration, metric="cosine", tolerance=0.008,
                                          quantize="int8", objective="size", ops=("MatMul",), batch_size=48, jobs=1,
                                          method="svd")  # the int8 fallback is the subject, not the method
    quantization = report.quantization
    kept, found = quantization.fallback_nodes, quantization.fallback
    assert kept, quantization
    assert found.error_int8_all > found.share == pytest.approx(0.6 * 0.008)
    assert quantization.error_quantized_alone == found.error_int8_fallback <= found.share
    assert all(node.error_reduction > 0 and node.extra_bytes > 0 for node in kept)
    assert all(node.scheme == "weight-only" for node in kept)  # MatMuls only here
    assert report.validation.passed and report.validation.value <= 0.008
    assert quantization.error_quantized == report.validation.value
    assert "int8 fallback" in report.phases
    for entry in kept:  # the node, or each node of the low-rank chain that replaced it, is a MatMulNBits
        nodes = [node for node in model.graph.node if node.name.startswith(entry.node)]
        assert nodes and all(node.op_type == "MatMulNBits" for node in nodes), entry.node
    console = Console(record=True, width=400)
    print_compress(report, console, written=True)
    printed = console.export_text()
    assert "int8: taken out of dynamic quantization" in printed and all(entry.node in printed for entry in kept)
    assert sum(quantization.nodes["weight_only"].values()) >= len(kept)
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= {node.op_type for node in model.graph.node}


def test_int8_alone_above_the_tolerance_is_a_bound_not_met():
    # 96 sentences (48 held out): int8 alone measures about 0.006 there, 600 times the tolerance
    with pytest.raises(BoundNotMet, match="int8 quantization alone"):
        onnx_lowrank.compress(MINILM, calibration=first_sentences(96), metric="cosine", tolerance=1e-5,
                              quantize="int8", objective="size", batch_size=32, method="svd")


def test_cli_html_report_and_int8_on_the_cnn(tmp_path):
    output, html, report = tmp_path / "out.onnx", tmp_path / "report.html", tmp_path / "report.json"
    code = onnx_lowrank.cli.main.main([
        "compress", str(DIGITS), "-o", str(output), "--calib", str(MODELS / "digits_calib.npz"),
        "--labels", str(MODELS / "digits_calib_labels.npy"), "--metric", "accuracy", "--tolerance", "0.02",
        "--method", "svd", "--quantize", "int8", "--html", str(html), "--report", str(report), "-q",
    ])
    assert code == 0
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("data:image/png;base64,") >= 3
    assert "Quantization" in page
    ops = {node.op_type for node in onnx.load(str(output)).graph.node}
    assert "QuantizeLinear" in ops or "QLinearConv" in ops


def test_cli_refuses_html_and_report_on_one_path(tmp_path, capsys):
    same = tmp_path / "r.out"
    code = onnx_lowrank.cli.main.main(["compress", str(DIGITS), "-o", str(tmp_path / "o.onnx"), "--target-params", "0.5",
                                  "--html", str(same), "--report", str(same)])
    assert code == 2 and "same file" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def _in_a_terminal(arguments: list[str]) -> str:
    """Run the command line with a pseudo-terminal as stdout and stderr; what it drew."""
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "onnx_lowrank", *arguments], stdout=follower, stderr=follower,
                               env={**os.environ, "COLUMNS": "120"})
    os.close(follower)
    drawn = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process is done
            break
        if not chunk:
            break
        drawn += chunk
    process.wait()
    os.close(leader)
    assert process.returncode == 0, drawn.decode(errors="replace")
    return drawn.decode(errors="replace")


def test_progress_bars_in_a_terminal_and_none_when_quiet(tmp_path):
    arguments = ["compress", str(DIGITS), "-o", str(tmp_path / "o.onnx"), "--calib", str(MODELS / "digits_calib.npz"),
                 "--target-params", "0.5", "--method", "svd", "--objective", "size"]
    drawn = _in_a_terminal(arguments)
    assert "statistics" in drawn and "factorizations" in drawn and "validated candidates" in drawn
    assert _in_a_terminal([*arguments, "-q"]) == ""


@pytest.mark.skipif("CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="needs onnxruntime's CUDAExecutionProvider (onnx-lowrank[gpu] on a GPU machine)")
def test_balanced_on_cuda_tiles_ranks_for_tensor_cores_and_times_there():
    _, report = onnx_lowrank.compress(MINILM, calibration=SENTENCES, metric="cosine", tolerance=0.02,
                                      provider="cuda", batch_size=32)
    assert report.validation.provider == "cuda" and report.latency.provider == "cuda"
    assert all(rank % RANK_MULTIPLE["cuda"] == 0 for rank in _ranks(report))
    assert all(layer.latency["factorized_ms"] > 0 for layer in report.layers)
