"""The report's JSON form (Report.to_json): its keys at every level are pinned, as the code wrote them
before the sections became dataclasses (onnx_lowrank.report), and optional keys stay absent when unknown.

One real run fills every section: the digits CNN in compact mode with int8 (latency, fusions, quantization
with its fallback, the chosen point, the trace). The key lists were recorded from that run's JSON; their
order is pinned too (json.dumps keeps it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import onnx_lowrank
from onnx_lowrank.report import (
    Chosen,
    FallbackSearch,
    FallbackStep,
    FusionChange,
    Fusions,
    Latency,
    Quantization,
    Report,
    Timing,
    TracePoint,
    as_dict,
)

MODELS = Path(__file__).resolve().parents[1] / "models"

TOP = ["params_before", "params_after", "bytes_before", "bytes_after", "seconds", "ops_before", "ops_after", "layers",
       "skipped", "validation", "mode", "phases", "trace", "factorizable_params", "chosen", "objective", "latency",
       "fusions", "notes", "quantization", "refit", "refit_layers"]
LATENCY = ["provider", "batch", "threads", "runs", "original", "compressed", "factorized", "speedup"]
TIMING = ["median_ms", "p10_ms", "p90_ms", "runs"]
FUSIONS = ["provider", "level", "original", "compressed", "unfactorized", "unfactorized_match", "lost", "gained"]
FUSION_CHANGE = ["kind", "layer", "original", "compressed"]
QUANTIZATION = ["scheme", "bytes_factorized", "bytes_quantized", "error_factorized", "error_quantized",
                "error_quantized_alone", "nodes", "range", "range_reason", "fallback_nodes", "fallback"]
QUANTIZED_NODES = ["scheme", "nodes", "schemes", "float", "notes", "range", "range_reason"]
FALLBACK = ["share", "error_int8_all", "error_int8_fallback", "nodes_measured", "checks", "seconds"]
FALLBACK_STEP = ["node", "op", "scheme", "error_reduction", "extra_bytes", "error_after"]
CHOSEN = ["params", "error"]
TRACE = ["params", "error", "samples"]


@pytest.fixture(scope="module")
def report() -> Report:
    _, report = onnx_lowrank.compress(MODELS / "digits_cnn.onnx", calibration=MODELS / "digits_calib.npz",
                                      quantize="int8", tolerance=0.05, method="svd", jobs=1)
    return report


def test_json_keys_of_a_full_run(report):
    data = json.loads(report.to_json())
    assert list(data) == TOP
    assert data["mode"] == "compact"
    latency = data["latency"]
    assert list(latency) == LATENCY
    for name in ("original", "compressed", "factorized"):
        assert list(latency[name]) == TIMING, name
    fusions = data["fusions"]
    assert list(fusions) == FUSIONS
    assert list(fusions["unfactorized"]) == ["original", "compressed"]
    for entry in fusions["lost"] + fusions["gained"]:
        assert list(entry) == FUSION_CHANGE, entry
    quantization = data["quantization"]
    assert list(quantization) == QUANTIZATION
    assert list(quantization["nodes"]) == QUANTIZED_NODES
    assert list(quantization["fallback"]) == FALLBACK
    for step in quantization["fallback_nodes"]:
        assert list(step) == FALLBACK_STEP, step
    assert list(data["chosen"]) == CHOSEN
    assert data["trace"]
    for point in data["trace"]:
        assert list(point) == TRACE, point


def test_json_form_reads_back(report):
    data = report.to_dict()
    again = Report.from_dict(json.loads(report.to_json()))
    assert again.to_dict() == data
    assert isinstance(again.latency.original, Timing) and isinstance(again.chosen, Chosen)
    assert all(isinstance(point, TracePoint) for point in again.trace)


def test_optional_keys_are_absent_when_unknown():
    failed = Latency("cpu", 8, None, error="onnxruntime could not time the models")
    assert list(as_dict(failed)) == ["provider", "batch", "threads", "error"]
    timing = Timing(1.0, 0.9, 1.2, 10)
    timed = Latency("cpu", 8, None, runs=10, original=timing, compressed=timing, speedup=1.0)
    assert list(timed.to_dict()) == ["provider", "batch", "threads", "runs", "original", "compressed", "speedup"]
    assert list(Fusions(error="onnxruntime could not optimize the models").to_dict()) == ["error"]
    change = FusionChange("Gemm", None, 1, 0)
    assert list(as_dict(change)) == FUSION_CHANGE
    quantization = Quantization("int8", 100, 25, None, None, None, {}, "full", "requested")
    assert list(quantization.to_dict()) == QUANTIZATION[:-2]  # no fallback outside compact mode
    compact = Quantization("int8", 100, 25, 0.01, 0.02, 0.01, {}, "full", "requested",
                           fallback_nodes=[FallbackStep("n", "Gemm", "weight-only", 0.01, 10, 0.005)],
                           fallback=FallbackSearch(0.03, 0.04, 0.02, 3, 2, 1.5))
    assert list(compact.to_dict()) == QUANTIZATION
    assert list(compact.to_dict()["fallback_nodes"][0]) == FALLBACK_STEP
    assert list(as_dict(TracePoint(10, 0.1, 90))) == TRACE
    assert list(as_dict(TracePoint(10, 0.1, 90, threatened=3))) == [*TRACE, "threatened"]
