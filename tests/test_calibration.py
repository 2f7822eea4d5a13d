"""Calibration data: every source kind, every way it can be wrong, the seeded split, the provider.

Fast: a two-input model built here (x, m float32 [N, 16] -> Mul -> MatMul+Add -> Relu -> Gemm -> y [N, 10],
nearly low-rank weights) and the real digits CNN in models/ (input `image` [N, 1, 8, 8], logits [N, 10]).

* Sources: an .npz of stacked samples, a folder of one-sample .npz feeds, a CalibrationDataReader subclass,
  a dict of stacked arrays and a list of feed dicts hold the same samples and must give the same model and
  validation (byte-identical among the stacked sources and among the one-feed-per-sample sources; the two
  families only differ by float32 rounding of batched vs single runs in ONNX Runtime).
* Bad data: `compress_file` raises InputError naming the problem, the command exits 2 with exactly one
  `onnx-lowrank: error: ...` line and no traceback; nothing is written and the input is unchanged.
* Split: seeded; the report's validation value is the metric on exactly the seed's held-out samples.
* Provider: `cuda` on a CPU-only onnxruntime warns and validates on the CPU; `auto` resolves to the CPU.

The digits runs that test how data reaches the tool (sources, split, seed, batch size, provider) use method
svd (METHOD): `auto` also tries every Conv decomposition, CP among them, which is most of a digits run's time
and has nothing to do with the data path.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_model, shared_run
from onnx import helper
from onnxruntime.quantization import CalibrationDataReader

import onnx_lowrank
from onnx_lowrank.cli.main import main as cli_main
from onnx_lowrank.observe.calibration import Samples, split

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
DIGITS = MODELS / "digits_cnn.onnx"
DIGITS_CALIB = MODELS / "digits_calib.npz"
DIGITS_LABELS = MODELS / "digits_calib_labels.npy"
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
ERROR_PREFIX = "onnx-lowrank: error:"
METHOD = "svd"  # for the digits runs about the data path (see the module docstring)

# ---------------------------------------------------------------------------------------------- helpers


def low_rank(rng: np.random.Generator, rows: int, cols: int, rank: int = 3, noise: float = 0.02) -> np.ndarray:
    matrix = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) / np.sqrt(cols)
    return (matrix + noise * rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)


def two_input_model() -> onnx.ModelProto:
    """x, m float32 ["N", 16] -> Mul -> MatMul(16x32) -> Add -> Relu -> Gemm(transB, 10x32) -> y ["N", 10]."""
    rng = np.random.default_rng(2024)
    nodes = [
        helper.make_node("Mul", ["x", "m"], ["h"], name="mul"),
        helper.make_node("MatMul", ["h", "w1"], ["a"], name="matmul"),
        helper.make_node("Add", ["a", "b1"], ["a2"], name="bias"),
        helper.make_node("Relu", ["a2"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "c2"], ["y"], name="gemm", transB=1),
    ]
    weights = {
        "w1": low_rank(rng, 32, 16).T.copy(),
        "b1": (0.1 * rng.standard_normal(32)).astype(np.float32),
        "w2": low_rank(rng, 10, 32),
        "c2": (0.1 * rng.standard_normal(10)).astype(np.float32),
    }
    return make_model(nodes, {"x": ["N", 16], "m": ["N", 16]}, {"y": ["N", 10]}, weights)


def two_input_data(count: int = 48, seed: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((count, 16)).astype(np.float32),
        "m": rng.uniform(0.5, 1.5, (count, 16)).astype(np.float32),
    }


def digits_images(count: int | None = None) -> np.ndarray:
    with np.load(DIGITS_CALIB) as data:
        images = data["image"]
    return images if count is None else images[:count]


def feeds_of(arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """One feed per sample, each keeping its batch axis of 1."""
    count = len(next(iter(arrays.values())))
    return [{name: array[i : i + 1] for name, array in arrays.items()} for i in range(count)]


class ListReader(CalibrationDataReader):
    """The onnxruntime quantization reader protocol: get_next() until None."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


def write_folder(folder: Path, feeds: list[dict[str, np.ndarray]]) -> Path:
    """One .npz per feed, named so that the folder's sorted order is the feeds' order."""
    folder.mkdir()
    for i, feed in enumerate(feeds):
        np.savez(folder / f"sample_{i:05d}.npz", **feed)
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): ("dir" if p.is_dir() else sha256(p)) for p in sorted(root.rglob("*"))
    }


def session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else Path(model).read_bytes()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def rel_l2(reference: np.ndarray, candidate: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    return float(np.linalg.norm(candidate.astype(np.float64) - reference) / np.linalg.norm(reference))


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def comparable(report: onnx_lowrank.Report) -> dict:
    """The report without wall-clock fields (and the note that end-to-end timing alone decides)."""
    data = report.to_dict()
    data.pop("seconds")
    data.pop("phases")
    data.pop("latency")  # end-to-end timings
    data["notes"] = [note for note in data["notes"] if not note.startswith("end to end the compressed model ran")]
    return data


@pytest.fixture(scope="module")
def two_input(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "two_input.onnx"
    onnx.save(two_input_model(), str(path))
    return path


# ---------------------------------------------------------------------------------------------- sources


def test_two_input_model_compresses_in_compact_mode(two_input: Path):
    """The model built here is a sound base for the error cases: good data compresses it."""
    model, report = onnx_lowrank.compress(two_input, two_input_data(), tolerance=0.05, objective="size")
    assert report.mode == "compact"
    assert report.validation.passed is True
    assert report.validation.samples == 24
    assert report.params_after < report.params_before
    onnx.checker.check_model(model, full_check=True)


def test_every_source_kind_gives_the_same_result(tmp_path: Path):
    images = digits_images(64)
    arrays = {"image": images}
    npz = tmp_path / "calib.npz"
    np.savez(npz, image=images)
    folder = write_folder(tmp_path / "feeds", feeds_of(arrays))
    sources: dict[str, Callable[[], object]] = {
        "npz": lambda: npz,
        "npz-str": lambda: str(npz),
        "dict": lambda: dict(arrays),
        "folder": lambda: folder,
        "reader": lambda: ListReader(feeds_of(arrays)),
        "list": lambda: feeds_of(arrays),
        "generator": lambda: (feed for feed in feeds_of(arrays)),
    }
    results = {}
    for name, make in sources.items():
        model, report = onnx_lowrank.compress(DIGITS, make(), tolerance=0.05, objective="size", method=METHOD)
        assert report.validation is not None, name
        assert report.validation.samples == 32, name  # half of 64 held out
        assert report.validation.passed is True, name
        results[name] = (model, report)

    stacked, single = ("npz", "npz-str", "dict"), ("folder", "reader", "list", "generator")
    for family in (stacked, single):
        first_model, first_report = results[family[0]]
        for name in family[1:]:
            model, report = results[name]
            assert model.SerializeToString() == first_model.SerializeToString(), (family[0], name)
            assert comparable(report) == comparable(first_report), (family[0], name)

    # across the families: the same choices and validation, factors equal up to float32 rounding
    (a_model, a), (b_model, b) = results["npz"], results["folder"]
    assert [(layer.node, layer.rank) for layer in a.layers] == [(layer.node, layer.rank) for layer in b.layers]
    assert a.params_after == b.params_after
    assert a.validation.samples == b.validation.samples
    assert b.validation.value == pytest.approx(a.validation.value, rel=1e-5)
    a_weights, b_weights = initializers(a_model), initializers(b_model)
    assert a_weights.keys() == b_weights.keys()
    for name, value in a_weights.items():
        scale = max(float(np.max(np.abs(value))), 1e-30) if value.size else 1.0
        np.testing.assert_allclose(b_weights[name], value, rtol=0, atol=1e-4 * scale, err_msg=name)


def test_folder_and_npz_via_cli_agree(tmp_path: Path):
    """--calib takes an .npz of stacked samples or a folder of feeds; both choose the same factorization."""
    images = digits_images(40)
    npz = tmp_path / "calib.npz"
    np.savez(npz, image=images)
    folder = write_folder(tmp_path / "feeds", feeds_of({"image": images}))
    shapes = {}
    for name, calib in (("npz", npz), ("folder", folder)):
        out = tmp_path / f"{name}.onnx"
        assert cli_main(["compress", str(DIGITS), "-o", str(out), "--calib", str(calib), "--objective", "size",
                         "--method", METHOD, "-q"]) == 0
        model = onnx.load(str(out))
        onnx.checker.check_model(model, full_check=True)
        shapes[name] = {t.name: list(t.dims) for t in model.graph.initializer}
    assert shapes["npz"] == shapes["folder"]


def test_two_input_sources_agree(tmp_path: Path):
    arrays = two_input_data()
    npz = tmp_path / "two.npz"
    np.savez(npz, **arrays)
    folder = write_folder(tmp_path / "feeds", feeds_of(arrays))
    values = {}
    for name, source in (("npz", npz), ("dict", arrays), ("folder", folder), ("reader", ListReader(feeds_of(arrays))),
                         ("list", feeds_of(arrays))):
        _, report = onnx_lowrank.compress(two_input_model(), source, tolerance=0.05, objective="size")
        values[name] = (report.params_after, [layer.rank for layer in report.layers], report.validation.value)
    first = values["npz"]
    for name, (params, ranks, value) in values.items():
        assert (params, ranks) == first[:2], name
        assert value == pytest.approx(first[2], rel=1e-5), name


# ---------------------------------------------------------------------------------------------- bad data


@dataclass
class Bad:
    """One bad-input case: builds the calibration (and labels) in a folder; `match` is searched in the message."""

    name: str
    match: str
    calib: Callable[[Path], object] | None  # -> a path (CLI-able) or any API source
    options: dict = field(default_factory=dict)
    labels: Callable[[Path], object] | None = None


def _npz(arrays: dict[str, np.ndarray], name: str = "calib.npz") -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / name
        np.savez(path, **arrays)
        return path

    return build


def _good(count: int = 48) -> dict[str, np.ndarray]:
    return two_input_data(count)


def _with(**changes: np.ndarray) -> dict[str, np.ndarray]:
    arrays = _good()
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


def _nan() -> np.ndarray:
    x = _good()["x"].copy()
    x[7, 3] = np.nan
    return x


def _inf() -> np.ndarray:
    x = _good()["x"].copy()
    x[30, 0] = -np.inf
    return x


def _garbage(folder: Path) -> Path:
    path = folder / "broken.npz"
    path.write_bytes(b"this is not a zip archive\x00\x01\x02" * 10)
    return path


def _truncated(folder: Path) -> Path:
    good = folder / "good.npz"
    np.savez(good, **_good())
    path = folder / "truncated.npz"
    path.write_bytes(good.read_bytes()[:200])
    good.unlink()
    return path


def _npy(folder: Path) -> Path:
    """A plain .npy (one array, no input names) where an .npz is expected."""
    path = folder / "x.npy"
    np.save(path, _good()["x"])
    return path


def _empty_folder(folder: Path) -> Path:
    (folder / "empty").mkdir()
    return folder / "empty"


def _folder_with_garbage(folder: Path) -> Path:
    feeds = write_folder(folder / "feeds", feeds_of(_good(20)))
    (feeds / "sample_00003.npz").write_bytes(b"garbage")
    return feeds


def _folder_with_a_bad_feed(folder: Path) -> Path:
    feeds = feeds_of(_good(20))
    feeds[5] = {"x": feeds[5]["x"]}  # lacks m
    return write_folder(folder / "feeds", feeds)


def _labels(count: int) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / "labels.npy"
        np.save(path, np.arange(count) % 10)
        return path

    return build


BAD = [
    Bad("missing input", r"lacks model input 'm'", _npz(_with(m=None))),
    Bad("unknown input", r"'z'.*not a model input", _npz(_with(z=np.zeros((48, 16), np.float32)))),
    Bad("wrong dtype", r"'x'.*dtype float64.*expects float32", _npz(_with(x=_good()["x"].astype(np.float64)))),
    Bad("wrong rank", r"'x'.*3 dimensions.*expects 2", _npz(_with(x=_good()["x"][:, :, None]))),
    Bad("static dim mismatch", r"'x'.*size 15 on axis 1.*expects 16", _npz(_with(x=_good()["x"][:, :15]))),
    Bad("empty set", r"empty", _npz({"x": np.zeros((0, 16), np.float32), "m": np.zeros((0, 16), np.float32)})),
    Bad("empty folder", r"no \.npz files", _empty_folder),
    Bad("npz without arrays", r"holds no arrays", _npz({})),
    Bad("too few samples (10)", r"too few calibration samples \(10\).*16", _npz(_good(10))),
    Bad("too few samples (15)", r"too few calibration samples \(15\)", _npz(_good(15))),
    Bad("too few feeds in a folder", r"too few calibration samples \(10\)",
        lambda folder: write_folder(folder / "feeds", feeds_of(_good(10)))),
    Bad("NaN", r"'x'.*NaN or Inf", _npz(_with(x=_nan()))),
    Bad("Inf", r"'x'.*NaN or Inf", _npz(_with(x=_inf()))),
    Bad("different sample counts", r"disagree on the number of samples", _npz(_with(m=_good()["m"][:30]))),
    Bad("scalar array", r"scalar", _npz(_with(m=np.float32(1.0)))),
    Bad("labels of the wrong length", r"labels hold 47 entries for 48", _npz(_good()), {"metric": "accuracy"},
        labels=_labels(47)),
    Bad("accuracy without labels", r"accuracy metric needs labels", _npz(_good()), {"metric": "accuracy"}),
    Bad("tolerance without calib", r"--tolerance needs calibration data", None,
        {"target_params": 0.5, "tolerance": 0.1}),
    Bad("labels without calib", r"--labels needs calibration data", None, {"target_params": 0.5}, labels=_labels(48)),
    Bad("compact mode without calib", r"--calib", None, {}),
    Bad("tolerance 0 (rel-l2)", r"tolerance must be a positive number", _npz(_good()), {"tolerance": 0.0}),
    Bad("tolerance 0 (cosine)", r"tolerance must be a positive number", _npz(_good()),
        {"tolerance": 0.0, "metric": "cosine"}),
    Bad("tolerance < 0", r"tolerance must be a positive number", _npz(_good()), {"tolerance": -0.1}),
    Bad("tolerance < 0 (accuracy)", r"tolerance must be a positive number", _npz(_good()),
        {"tolerance": -0.01, "metric": "accuracy"}, labels=_labels(48)),
    Bad("tolerance NaN", r"tolerance must be a positive number", _npz(_good()), {"tolerance": float("nan")}),
    Bad("nonexistent calib path", r"no such file or folder", lambda folder: folder / "nowhere.npz"),
    Bad("unreadable npz (garbage)", r"cannot read calibration file", _garbage),
    Bad("unreadable npz (truncated)", r"cannot read calibration file", _truncated),
    Bad("npy instead of npz", r"calibration", _npy),
    Bad("unreadable npz in a folder", r"cannot read calibration file", _folder_with_garbage),
    Bad("a folder feed lacks an input", r"calibration feed 5 lacks model input 'm'", _folder_with_a_bad_feed),
    Bad("unreadable labels", r"cannot read labels", _npz(_good()), {"metric": "accuracy"},
        labels=lambda folder: _garbage(folder)),
    Bad("unknown metric", r"unknown metric", _npz(_good()), {"metric": "l1"}),
    Bad("unknown provider", r"unknown provider", _npz(_good()), {"provider": "tpu"}),
]

_FLAGS = {
    "tolerance": "--tolerance",
    "metric": "--metric",
    "target_params": "--target-params",
    "provider": "--provider",
}


def _cli_flags(options: dict) -> list[str]:
    flags = []
    for key, value in options.items():
        flags += [_FLAGS[key], repr(value) if isinstance(value, float) else str(value)]
    return flags


@pytest.mark.parametrize("case", BAD, ids=[case.name for case in BAD])
def test_bad_calibration_api(case: Bad, two_input: Path, tmp_path: Path):
    calib = case.calib(tmp_path) if case.calib else None
    labels = case.labels(tmp_path) if case.labels else None
    before, model_sha = tree(tmp_path), sha256(two_input)
    out = tmp_path / "out.onnx"
    with pytest.raises(onnx_lowrank.InputError, match=case.match) as raised:
        onnx_lowrank.compress_file(two_input, out, calibration=calib, labels=labels, **case.options)
    message = str(raised.value)
    assert "\n" not in message and message.strip() == message and message
    assert not out.exists()
    assert tree(tmp_path) == before, "compress_file left files behind"
    assert sha256(two_input) == model_sha
    # the in-memory API says the same
    with pytest.raises(onnx_lowrank.InputError, match=case.match):
        onnx_lowrank.compress(onnx.load(str(two_input)), calibration=calib, labels=labels, **case.options)


CLI_BAD = [case for case in BAD if case.name not in ("unknown metric", "unknown provider", "tolerance NaN")]


@pytest.mark.parametrize("case", CLI_BAD, ids=[case.name for case in CLI_BAD])
def test_bad_calibration_cli(case: Bad, two_input: Path, tmp_path: Path, capsys):
    calib = case.calib(tmp_path) if case.calib else None
    labels = case.labels(tmp_path) if case.labels else None
    model = tmp_path / "model.onnx"
    model.write_bytes(two_input.read_bytes())
    out = tmp_path / "out.onnx"
    argv = ["compress", str(model), "-o", str(out), *_cli_flags(case.options)]
    if calib is not None:
        argv += ["--calib", str(calib)]
    if labels is not None:
        argv += ["--labels", str(labels)]
    before = tree(tmp_path)
    capsys.readouterr()
    code = cli_main(argv)
    captured = capsys.readouterr()
    assert code == 2, (captured.out, captured.err)
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    assert re.search(case.match, lines[0]), lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists()
    assert tree(tmp_path) == before


def test_bad_calibration_cli_subprocess(two_input: Path, tmp_path: Path):
    """The real command, in its own process: NaN data -> exit 2, one line, no traceback, nothing written."""
    calib = _npz(_with(x=_nan()))(tmp_path)
    model = tmp_path / "model.onnx"
    model.write_bytes(two_input.read_bytes())
    out = tmp_path / "out.onnx"
    before = tree(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "ONNX_LOWRANK_DEBUG"}
    done = subprocess.run([sys.executable, "-m", "onnx_lowrank", "compress", str(model), "-o", str(out), "--calib",
                           str(calib), "--tolerance", "0.05"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"{ERROR_PREFIX} ") and "NaN or Inf" in done.stderr
    assert "Traceback" not in done.stderr
    assert tree(tmp_path) == before


@dataclass
class BadFeeds:
    name: str
    match: str
    source: Callable[[], object]


def _feeds_with(position: int, **changes) -> list[dict[str, np.ndarray]]:
    feeds = feeds_of(_good(24))
    feeds[position] = {**feeds[position], **changes}
    feeds[position] = {k: v for k, v in feeds[position].items() if v is not None}
    return feeds


BAD_FEEDS = [
    BadFeeds("empty list", r"empty", lambda: []),
    BadFeeds("empty reader", r"empty", lambda: ListReader([])),
    BadFeeds("empty dict", r"holds no arrays", lambda: {}),
    BadFeeds("feed lacks an input", r"calibration feed 4 lacks model input 'm'", lambda: _feeds_with(4, m=None)),
    BadFeeds("feed has an unknown input", r"calibration feed 2 has 'q'",
             lambda: _feeds_with(2, q=np.zeros((1, 16), np.float32))),
    BadFeeds("feed of the wrong dtype", r"feed 9: input 'm' has dtype float16",
             lambda: _feeds_with(9, m=np.ones((1, 16), np.float16))),
    BadFeeds("feed of the wrong rank", r"feed 1: input 'x' has 1 dimensions",
             lambda: _feeds_with(1, x=np.ones(16, np.float32))),
    BadFeeds("feed with NaN", r"feed 20: input 'x' contains NaN",
             lambda: _feeds_with(20, x=np.full((1, 16), np.nan, np.float32))),
    BadFeeds("reader with too few feeds", r"too few calibration samples \(12\)",
             lambda: ListReader(feeds_of(_good(12)))),
    BadFeeds("dict with different counts", r"disagree", lambda: {"x": _good(20)["x"], "m": _good(21)["m"]}),
    BadFeeds("not a source", r"calibration must be", lambda: 42),
]


@pytest.mark.parametrize("case", BAD_FEEDS, ids=[case.name for case in BAD_FEEDS])
def test_bad_feed_sources(case: BadFeeds, two_input: Path):
    with pytest.raises(onnx_lowrank.InputError, match=case.match):
        onnx_lowrank.compress(two_input, case.source(), tolerance=0.05)


def test_labels_as_an_array_of_the_wrong_length(two_input: Path):
    with pytest.raises(onnx_lowrank.InputError, match=r"labels hold 50 entries for 48"):
        onnx_lowrank.compress(two_input, _good(), labels=np.zeros(50, np.int64), metric="accuracy")


def test_sixteen_samples_are_enough(two_input: Path):
    _, report = onnx_lowrank.compress(two_input, _good(16), tolerance=0.05, objective="size")
    assert report.validation.samples == 8


def test_accuracy_allows_tolerance_zero():
    images = digits_images()
    labels = np.load(DIGITS_LABELS)
    _, report = onnx_lowrank.compress(DIGITS, {"image": images}, labels=labels, metric="accuracy", tolerance=0,
                                      objective="size", method=METHOD)
    assert report.validation.tolerance == 0
    assert report.validation.lost == report.validation.ties_lost  # near-ties of the original apart
    assert report.validation.passed is True


def static_batch_model() -> onnx.ModelProto:
    """x float32 [1, 16] (a fixed batch of one, as many exported models have) -> MatMul -> Relu -> MatMul
    -> y [1, 8]."""
    rng = np.random.default_rng(11)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="matmul1"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="matmul2"),
    ]
    weights = {"w1": low_rank(rng, 32, 16).T.copy(), "w2": low_rank(rng, 8, 32).T.copy()}
    return make_model(nodes, {"x": [1, 16]}, {"y": [1, 8]}, weights)


def test_static_batch_of_one_with_stacked_samples(tmp_path: Path, capsys):
    """An .npz stacks samples on axis 0; for a model whose batch axis is fixed at 1 the tool must feed them so
    that the model runs (or refuse the data with an InputError), never end in an internal error."""
    model_path = tmp_path / "static.onnx"
    onnx.save(static_batch_model(), str(model_path))
    x = np.random.default_rng(3).standard_normal((40, 16)).astype(np.float32)
    try:
        _, report = onnx_lowrank.compress(model_path, {"x": x}, tolerance=0.05, objective="size")
    except onnx_lowrank.InputError:
        pass
    else:
        assert report.validation.passed is True
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=x)
    code = cli_main(["compress", str(model_path), "-o", str(tmp_path / "out.onnx"), "--calib", str(calib),
                     "--objective", "size", "-q"])
    err = capsys.readouterr().err
    assert code in (0, 2), err
    assert len(err.splitlines()) <= 1, err


# ---------------------------------------------------------------------------------------------- split


def _held_out_rel_l2(model: onnx.ModelProto, images: np.ndarray, indices: list[int]) -> float:
    reference = session(DIGITS).run(None, {"image": images[indices]})[0]
    candidate = session(model).run(None, {"image": images[indices]})[0]
    return rel_l2(reference, candidate)


def test_split_is_seeded_and_reproducible():
    images = digits_images()
    count = len(images)
    runs = {}
    for seed in (0, 0, 1):
        model, report = onnx_lowrank.compress(DIGITS, {"image": images}, tolerance=0.05, seed=seed,
                                              objective="size", method=METHOD)
        runs.setdefault(seed, []).append((model, report))

    (model_a, report_a), (model_b, report_b) = runs[0]
    assert model_a.SerializeToString() == model_b.SerializeToString()
    assert comparable(report_a) == comparable(report_b)

    # the split itself: half held out, disjoint, covering, seeded
    parts = {seed: split(_samples_like(count), seed) for seed in (0, 1)}
    for part in parts.values():
        assert abs(len(part.validation) - count / 2) <= 0.5
        assert set(part.fit).isdisjoint(part.validation)
        assert sorted(part.fit + part.validation) == list(range(count))
    assert parts[0].validation != parts[1].validation
    assert split(_samples_like(count), 0) == parts[0]

    # the report's validation value is the metric on exactly this seed's held-out samples
    for seed in (0, 1):
        model, report = runs[seed][0]
        assert report.validation.passed is True
        assert report.validation.value <= 0.05
        assert report.validation.samples == len(parts[seed].validation)
        onnx.checker.check_model(model, full_check=True)
        measured = _held_out_rel_l2(model, images, parts[seed].validation)
        assert measured == pytest.approx(report.validation.value, rel=1e-6)
    # seed 1's model measured on seed 0's held-out part is not what seed 1 reports
    other = _held_out_rel_l2(runs[1][0][0], images, parts[0].validation)
    assert other != pytest.approx(runs[1][0][1].validation.value, rel=1e-9)


def _samples_like(count: int) -> Samples:
    """Stand-in samples for locating the package's seeded split of `count` samples."""
    return Samples([{} for _ in range(count)], batched=True)


def test_seed_via_cli_is_reproducible(tmp_path: Path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.onnx"
        code = cli_main(["compress", str(DIGITS), "-o", str(out), "--calib", str(DIGITS_CALIB), "--seed", "7",
                         "--batch-size", "16", "--objective", "size", "--method", METHOD, "-q"])
        assert code == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_batch_size_does_not_change_the_choice():
    images = digits_images(96)
    reports = [onnx_lowrank.compress(DIGITS, {"image": images}, tolerance=0.05, batch_size=b, objective="size",
                                     method=METHOD)[1]
               for b in (1, 7, 96)]
    for report in reports[1:]:
        assert [layer.rank for layer in report.layers] == [layer.rank for layer in reports[0].layers]
        assert report.validation.value == pytest.approx(reports[0].validation.value, rel=1e-4)


# ---------------------------------------------------------------------------------------------- provider


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA")
def test_cuda_without_cuda_warns_and_runs_on_cpu():
    with pytest.warns(RuntimeWarning, match="CUDA"):
        _, report = onnx_lowrank.compress(DIGITS, DIGITS_CALIB, tolerance=0.05, provider="cuda", objective="size",
                                          method=METHOD)
    assert report.validation.provider == "cpu"
    assert report.validation.passed is True


def test_auto_provider_resolves():
    _, report = onnx_lowrank.compress(DIGITS, DIGITS_CALIB, tolerance=0.05, provider="auto", objective="size",
                                      method=METHOD)
    assert report.validation.provider == ("cuda" if HAS_CUDA else "cpu")


def test_cpu_provider_is_default_and_reported():
    # compress(DIGITS, DIGITS_CALIB, tolerance=0.05, objective="size", method="svd"), shared with tests/test_error_bound.py
    report = shared_run("digits compact 0.05").report
    assert report.validation.provider == "cpu"


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime's CUDAExecutionProvider")
def test_cuda_provider_validates_on_cuda():
    _, report = onnx_lowrank.compress(DIGITS, DIGITS_CALIB, tolerance=0.05, provider="cuda", objective="size")
    assert report.validation.provider == "cuda"
    assert report.validation.passed is True


def test_too_few_samples_under_top1_gives_the_real_split(two_input: Path):
    """Issue 30, item 8: top1 and accuracy hold out three quarters, not half: the message says so."""
    with pytest.raises(onnx_lowrank.InputError, match=r"too few calibration samples \(12\): need at least 16 "
                       r"\(8 to fit the statistics, 8 to validate\); three quarters are held out to validate "
                       r"from 30 samples on \(22 validate, 8 fit\)"):
        onnx_lowrank.compress(two_input, _good(12), metric="top1", tolerance=0.05)
    with pytest.raises(onnx_lowrank.InputError, match=r"\(12\).*; half are held out to validate$"):
        onnx_lowrank.compress(two_input, _good(12), tolerance=0.05)
