"""`inspect`: weight spectra, or output spectra on calibration data."""

import subprocess
import sys
from pathlib import Path

from conftest import inspected

import onnx_lowrank

MODELS = Path(__file__).resolve().parents[1] / "models"


def test_output_spectra_on_data_are_more_concentrated_than_weight_spectra():
    # the weight spectra: onnx_lowrank.inspect(digits), shared with other modules (conftest.inspected)
    weights = {row.node: row for row in inspected(MODELS / "digits_cnn.onnx")}
    data = {row.node: row for row in onnx_lowrank.inspect(MODELS / "digits_cnn.onnx", calibration=MODELS / "digits_calib.npz")}
    assert weights.keys() == data.keys()
    for node, row in data.items():
        assert row.params == weights[node].params and row.break_even == weights[node].break_even
        assert 1 <= row.rank_90 <= row.rank_99 <= min(row.matrix)
        assert 0 < row.energy_at_break_even <= 1
    # trained convs and the hidden Gemm: far fewer output directions than weight directions matter
    for node in ("/2/Conv", "/5/Conv", "/9/Gemm"):
        assert data[node].rank_99 < weights[node].rank_99 / 2, node


def test_inspect_command_with_calibration():
    # --method svd: the spectra are the subject here; every method's fits (CP's take most of the time) are
    # inspected in-process in test_output_spectra_on_data_are_more_concentrated_than_weight_spectra
    result = subprocess.run(
        [sys.executable, "-m", "onnx_lowrank", "inspect", str(MODELS / "digits_cnn.onnx"), "--calib",
         str(MODELS / "digits_calib.npz"), "--method", "svd"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "output energy on the calibration data" in result.stdout and "/9/Gemm" in result.stdout
    assert "tucker2" not in result.stdout  # only the SVD's error at half size


def test_inspect_command_with_bad_calibration_is_one_line(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    result = subprocess.run(
        [sys.executable, "-m", "onnx_lowrank", "inspect", str(MODELS / "digits_cnn.onnx"), "--calib", str(bad)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("onnx-lowrank: error:")


def test_depthwise_convolutions_say_why_no_rank_shrinks_them():
    """Issue 30, item 8: a depthwise convolution (each group a single row) has no rank that saves parameters:
    no "energy kept 0.0%" for it; with only the SVD on offer it is listed as not factorizable, with the reason."""
    rows = {row.node: row for row in onnx_lowrank.inspect(MODELS / "ppocr_cls.onnx", method="svd")}
    depthwise = [row for row in rows.values() if row.reason and "depthwise" in row.reason]
    assert {"Conv@2", "Conv@7", "Conv@13"} <= {row.node for row in depthwise}
    assert "each of its 8 groups is a 1x9 matrix" in rows["Conv@2"].reason
    assert all(row.energy_at_break_even is None for row in depthwise)
    assert all(row.energy_at_break_even > 0 for row in rows.values() if row.reason is None)
    # every method: the 5x5 ones shrink by the spatial decomposition, yet keep no SVD energy to speak of
    every = {row.node: row for row in onnx_lowrank.inspect(MODELS / "ppocr_cls.onnx", method="spatial")}
    assert every["Conv@13"].reason is None and every["Conv@13"].energy_at_break_even is None
    assert "spatial" in every["Conv@13"].at_half
    result = subprocess.run([sys.executable, "-m", "onnx_lowrank", "inspect", str(MODELS / "ppocr_cls.onnx"),
                             "--method", "svd"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "0.0%" not in result.stdout and "depthwise convolution" in result.stdout
