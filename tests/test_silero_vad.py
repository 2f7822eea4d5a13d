"""Silero VAD (models/silero_vad.onnx, built by tools/build_silero.py): every Conv sits inside the branches of
one If on the sample rate, weights in Constant nodes. Compressed in compact mode on a third of the 16 kHz
calibration feeds (real speech from alsa-utils' recordings, with the states the original carries there),
the 16 kHz branch's Convs are factorized in place, the 8 kHz branch, never taken, keeps its weights with
the reason, and the model is valid, within its bound, and close on the evaluation recordings it never saw.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run

import onnx_lowrank

MODELS = Path(__file__).resolve().parents[1] / "models"
TOLERANCE = 0.05


def feeds(folder: str, step: int = 1) -> list[dict[str, np.ndarray]]:
    found = []
    for path in sorted((MODELS / folder).glob("*.npz"))[::step]:
        with np.load(path) as feed:
            found.append({name: feed[name] for name in feed.files})
    return found


@cache
def compressed() -> tuple[onnx.ModelProto, onnx_lowrank.Report]:
    return onnx_lowrank.compress(MODELS / "silero_vad.onnx", calibration=feeds("silero_calib", step=3),
                                 tolerance=TOLERANCE, objective="size", method="svd")


def test_silero_convs_inside_the_taken_branch_are_factorized_within_the_bound():
    model, report = compressed()
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert report.validation.passed and report.validation.value <= TOLERANCE
    assert report.layers and all(layer.node.startswith("If_0_then_branch") and layer.op == "Conv"
                                 for layer in report.layers)
    assert report.params_after < report.params_before
    untaken = [s for s in report.skipped if s.node.startswith("If_0_else_branch")]
    assert len(untaken) == 6 and {s.reason for s in untaken} == {
        "inside If 'If_0' else_branch: never taken on the calibration data"}
    original = onnx.load(MODELS / "silero_vad.onnx")
    assert [node.op_type for node in model.graph.node] == [node.op_type for node in original.graph.node]


@pytest.mark.parametrize("rate", [16000, 8000])
def test_silero_compressed_stays_close_on_unseen_recordings(rate):
    """16 kHz: the evaluation recordings within 1.5x the bound; 8 kHz (the untouched branch): exact."""
    model, _ = compressed()
    original = onnx.load(MODELS / "silero_vad.onnx")
    before, after = [], []
    for feed in feeds("silero_eval"):
        if rate == 8000:  # the same audio, every other sample, with a 32-sample context
            feed = {"input": np.ascontiguousarray(feed["input"][:, 32::2]), "state": feed["state"],
                    "sr": np.array(rate, np.int64)}
        before.append(run(original, feed)[0])
        after.append(run(model, feed)[0])
    reference, got = np.concatenate(before), np.concatenate(after)
    error = np.linalg.norm(got - reference) / np.linalg.norm(reference)
    assert error <= (1.5 * TOLERANCE if rate == 16000 else 1e-6), error


def test_a_refusal_comes_after_one_validation_and_says_what_inspect_says():
    """Issue 30, item 5: when the least compression on offer already fails, compact mode refuses at once (one
    validation on the selecting half of the held-out samples, no bisection), and the refusal says what
    `inspect` says of the layers: the energy they keep at their break-even ranks."""
    from onnx_lowrank.errors import BoundNotMet

    with pytest.raises(BoundNotMet) as refused:
        onnx_lowrank.compress(MODELS / "silero_vad.onnx", calibration=feeds("silero_calib")[:16], tolerance=0.001,
                              objective="size", method="svd")
    report = refused.value.report
    selecting = [trial for trial in report.trace if trial.samples == 4]  # half of the 8 held out
    assert len(selecting) == 1, report.trace  # fewer than 32 held out: one frontier, one validation
    assert selecting[0].params == max(t.params for t in report.trace if t.params < report.factorizable_params)
    message = str(refused.value)
    assert "at their break-even ranks" in message and "of their output energy (median" in message
    assert "onnx-lowrank inspect --calib" in message
