"""`--cache DIR`: a second run on the same model and data reuses the statistics and sensitivities.

What is reused must give exactly the result of a run without the cache; other data or another model
must not hit it; a damaged cache file is recomputed, not trusted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import onnx_lowrank
from onnx_lowrank.cli.main import main as cli_main
from onnx_lowrank.run import stages as pipeline

MODELS = Path(__file__).resolve().parents[1] / "models"
DIGITS = MODELS / "digits_cnn.onnx"
CALIB = MODELS / "digits_calib.npz"
OPTIONS = {"calibration": CALIB, "method": "svd", "objective": "size"}  # size: no timing, so runs compare exactly


def _same(first, second) -> None:
    (model_a, report_a), (model_b, report_b) = first, second
    assert model_a.SerializeToString() == model_b.SerializeToString()
    assert report_a.validation.value == report_b.validation.value


def test_second_run_with_another_tolerance_reuses_the_passes(tmp_path: Path, monkeypatch):
    cache = tmp_path / "cache"
    onnx_lowrank.compress(DIGITS, tolerance=0.05, cache=cache, **OPTIONS)
    stored = sorted(p.name for p in cache.iterdir())
    assert [name.split("-")[0] for name in stored] == ["sensitivity", "statistics"]

    def not_again(*args, **kwargs):
        raise AssertionError("a cached pass ran again")

    with monkeypatch.context() as patched:  # the passes themselves must not run (a timing would be flaky)
        patched.setattr(pipeline, "unit_statistics", not_again)
        patched.setattr(pipeline, "sensitivities", not_again)
        cached = onnx_lowrank.compress(DIGITS, tolerance=0.02, cache=cache, **OPTIONS)
    assert sorted(p.name for p in cache.iterdir()) == stored, "the same data must hit the same entries"
    _same(cached, onnx_lowrank.compress(DIGITS, tolerance=0.02, **OPTIONS))


def test_other_data_misses(tmp_path: Path):
    cache = tmp_path / "cache"
    onnx_lowrank.compress(DIGITS, tolerance=0.05, cache=cache, **OPTIONS)
    images = np.load(CALIB)["image"][:200]
    onnx_lowrank.compress(DIGITS, calibration={"image": images}, tolerance=0.05, cache=cache, method="svd",
                          objective="size")
    assert len(list(cache.glob("statistics-*.npz"))) == 2


def test_damaged_entry_is_recomputed(tmp_path: Path):
    cache = tmp_path / "cache"
    reference = onnx_lowrank.compress(DIGITS, target_params=0.4, cache=cache, **OPTIONS)
    for path in cache.iterdir():
        path.write_bytes(b"not what was stored")
    _same(reference, onnx_lowrank.compress(DIGITS, target_params=0.4, cache=cache, **OPTIONS))


def test_cache_folder_that_cannot_be_made_is_bad_input(tmp_path: Path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    code = cli_main(["compress", str(DIGITS), "-o", str(tmp_path / "out.onnx"), "--calib", str(CALIB),
                     "--cache", str(blocker / "cache")])
    assert code == 2
    assert "cannot use cache folder" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()


def test_margin_weighted_statistics_do_not_hit_the_plain_ones(tmp_path: Path):
    """accuracy weighs the least sure samples in its statistics: the same data under another metric is
    another entry (statistics and sensitivities alike), and the result is that of a run without the cache."""
    cache = tmp_path / "cache"
    onnx_lowrank.compress(DIGITS, tolerance=0.05, cache=cache, **OPTIONS)
    labelled = {"labels": MODELS / "digits_calib_labels.npy", "metric": "accuracy", "target_params": 0.4, **OPTIONS}
    cached = onnx_lowrank.compress(DIGITS, cache=cache, **labelled)
    assert len(list(cache.glob("statistics-*.npz"))) == 2 and len(list(cache.glob("sensitivity-*.json"))) == 2
    _same(cached, onnx_lowrank.compress(DIGITS, **labelled))
