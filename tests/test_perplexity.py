"""The perplexity metric for language models (metrics.py) and its targets (calibration.next_token_targets).

* The targets are the input ids shifted by one, -1 where the attention mask (over past + new tokens when
  it is longer) marks a position or its successor as padding, and at the last position.
* The metric against a direct numpy computation: exp(mean NLL of the candidate - mean NLL of the original)
  over the scored positions - 1; its bootstrap bound is a resample of the same quantity.
* A tiny bigram LM built here (ids -> Gather -> MatMul -> MatMul head -> logits) on text drawn from its own
  predictions, compressed in compact mode with --metric perplexity on the command line: the validated value
  is within the tolerance, and on new text the perplexity grows by no more than twice the unseen bound;
  --labels with perplexity and data without input_ids are bad input.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.check.evaluator import Evaluator
from onnx_lowrank.check.generalization import bootstrap
from onnx_lowrank.check.metrics import compared_outputs, score, token_nll
from onnx_lowrank.observe.calibration import Samples, load_calibration, next_token_targets

VOCABULARY, WIDTH, SEQ = 48, 24, 12


def tiny_lm(seed: int = 0, tied: bool = False) -> onnx.ModelProto:
    """input_ids [b, s] (and an unused attention_mask) -> embedding -> x @ W -> head -> logits [b, s, V]: a
    bigram model whose weights are nearly rank 6, so compact mode finds something to remove. `tied`: the
    head is the embedding table transposed (logits = h @ table^T)."""
    rng = np.random.default_rng(seed)
    table = np.concatenate([rng.standard_normal((VOCABULARY, 6)), 0.05 * rng.standard_normal((VOCABULARY, WIDTH - 6))],
                           axis=1).astype(np.float32)  # fmt: skip
    hidden = np.zeros((WIDTH, WIDTH))
    hidden[:6, :6] = rng.standard_normal((6, 6))
    hidden = (hidden + 0.02 * rng.standard_normal((WIDTH, WIDTH))).astype(np.float32)
    initializers = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(hidden, "hidden")]
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["h0"], name="embed"),
             helper.make_node("MatMul", ["h0", "hidden"], ["h1"], name="mlp")]  # fmt: skip
    if tied:
        nodes += [helper.make_node("Transpose", ["table"], ["table_t"], name="tie", perm=[1, 0]),
                  helper.make_node("MatMul", ["h1", "table_t"], ["logits"], name="lm_head")]  # fmt: skip
    else:
        head = np.concatenate([rng.standard_normal((6, VOCABULARY)), 0.05 * rng.standard_normal((WIDTH - 6, VOCABULARY))])
        initializers.append(numpy_helper.from_array(head.astype(np.float32), "head"))
        nodes.append(helper.make_node("MatMul", ["h1", "head"], ["logits"], name="lm_head"))
    graph = helper.make_graph(
        nodes, "tiny_lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCABULARY])],
        initializers,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def token_data(model: onnx.ModelProto, count: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Text the model predicts best: chains drawn from its own next-token distributions (the logits at a
    position depend on that token alone), and a full attention mask."""
    every = np.arange(VOCABULARY, dtype=np.int64)[None]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input_ids": every, "attention_mask": np.ones_like(every)})[0][0].astype(np.float64)
    transitions = np.exp(logits - logits.max(1, keepdims=True))
    transitions /= transitions.sum(1, keepdims=True)
    rng = np.random.default_rng(seed)
    ids = np.empty((count, SEQ), dtype=np.int64)
    ids[:, 0] = rng.integers(0, VOCABULARY, count)
    for t in range(1, SEQ):
        ids[:, t] = [rng.choice(VOCABULARY, p=transitions[i]) for i in ids[:, t - 1]]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def numpy_nll(logits: np.ndarray, ids: np.ndarray, valid: np.ndarray) -> tuple[float, int]:
    """Summed NLL of ids[t + 1] under logits[t] where valid[t] and valid[t + 1]; and the count."""
    logits = logits.astype(np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if valid[b, t] and valid[b, t + 1]:
                total -= log_probs[b, t, ids[b, t + 1]]
                count += 1
    return total, count


def test_targets_shift_the_ids_and_skip_padding():
    ids = np.array([[[5, 6, 7, 8]], [[1, 2, 3, 4]]])
    mask = np.array([[[1, 1, 1, 1]], [[0, 1, 1, 0]]])
    targets = next_token_targets(Samples([{"input_ids": i, "attention_mask": m} for i, m in zip(ids, mask)], True))
    np.testing.assert_array_equal(targets, [[[6, 7, 8, -1]], [[-1, 3, -1, -1]]])
    past = {"input_ids": np.array([[3, 4]]), "attention_mask": np.array([[0, 1, 1, 1]])}  # mask covers past too
    np.testing.assert_array_equal(next_token_targets(Samples([past], False)), [[[4, -1]]])


def test_metric_is_the_perplexity_ratio_less_one_and_bootstraps():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCABULARY, (6, 1, SEQ))
    mask = np.ones_like(ids)
    mask[2, 0, :3] = 0  # left padding
    reference = [rng.standard_normal((1, SEQ, VOCABULARY)).astype(np.float32) * 2 for _ in ids]
    candidate = [r + 0.5 * rng.standard_normal(r.shape).astype(np.float32) for r in reference]
    targets = next_token_targets(Samples([{"input_ids": i, "attention_mask": m} for i, m in zip(ids, mask)], True))
    ref = [numpy_nll(r, i, m) for r, i, m in zip(reference, ids, mask)]
    cand = [numpy_nll(c, i, m) for c, i, m in zip(candidate, ids, mask)]
    count = sum(n for _, n in ref)
    expected = np.exp((sum(s for s, _ in cand) - sum(s for s, _ in ref)) / count) - 1
    # exp runs in the logits' float32 (sums in float64): a few parts in 1e8 from the float64 formula
    assert score("perplexity", [reference], [candidate], targets) == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(token_nll(reference, targets), ref, rtol=1e-7)
    assert score("perplexity", [reference], [reference], targets) == 0.0
    bound = bootstrap("perplexity", [reference], [candidate], 0.95, labels=targets)
    assert expected < bound < 1.0 + expected  # a resample of the same ratio, above the point value


def cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnx_lowrank", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_compact_mode_with_perplexity_end_to_end(tmp_path):
    model = tiny_lm()
    onnx.save(model, tmp_path / "lm.onnx")
    data = token_data(model, 32)
    np.savez(tmp_path / "calib.npz", **data)
    done = cli("compress", "lm.onnx", "-o", "out.onnx", "--calib", "calib.npz", "--metric", "perplexity",
               "--tolerance", "0.05", "--objective", "size", "--report", "out.json", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    validation = report["validation"]
    assert validation["metric"] == "perplexity" and validation["passed"]
    assert 0 < validation["value"] <= 0.05 and validation["unseen_bound"] >= validation["value"]
    assert report["params_after"] < report["params_before"]
    # the model is the best predictor of its own text: every removal costs perplexity, and on new text
    # what validation promised holds (the unseen bound, with room for 32 samples' noise)
    fresh = token_data(model, 32, seed=7)
    sessions = [ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
                for name in ("lm.onnx", "out.onnx")]  # fmt: skip
    nll = [numpy_nll(s.run(None, fresh)[0], fresh["input_ids"], fresh["attention_mask"]) for s in sessions]
    assert 0 < np.exp((nll[1][0] - nll[0][0]) / nll[0][1]) - 1 < 2 * validation["unseen_bound"]


def test_perplexity_refuses_labels_and_data_without_input_ids(tmp_path):
    onnx.save(tiny_lm(), tmp_path / "lm.onnx")
    np.savez(tmp_path / "calib.npz", **token_data(tiny_lm(), 32))
    np.save(tmp_path / "labels.npy", np.zeros(32, dtype=np.int64))
    done = cli("compress", "lm.onnx", "-o", "out.onnx", "--calib", "calib.npz", "--metric", "perplexity",
               "--labels", "labels.npy", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2 and "--labels" in done.stderr
    renamed = tiny_lm()
    for node in renamed.graph.node:
        node.input[:] = ["tokens" if name == "input_ids" else name for name in node.input]
    renamed.graph.input[0].name = "tokens"
    onnx.save(renamed, tmp_path / "renamed.onnx")
    data = token_data(tiny_lm(), 32)
    np.savez(tmp_path / "tokens.npz", tokens=data["input_ids"], attention_mask=data["attention_mask"])
    done = cli("compress", "renamed.onnx", "-o", "out.onnx", "--calib", "tokens.npz", "--metric", "perplexity", cwd=tmp_path)
    assert done.returncode == 2 and "input_ids" in done.stderr and not (tmp_path / "out.onnx").exists()


def test_only_the_logits_are_compared_and_probed():
    """A decoder's KV-cache outputs are no part of its perplexity: the evaluator compares and probes the
    first output alone (the others would inflate the sensitivity of the key / value projections)."""
    model = tiny_lm()
    model.graph.output.append(helper.make_tensor_value_info("h1", TensorProto.FLOAT, ["batch", "seq", WIDTH]))
    samples = load_calibration(token_data(tiny_lm(), 16), model)
    names = [o.name for o in model.graph.output]
    evaluator = Evaluator(model, samples, "cpu", 8, compared=compared_outputs("perplexity", names))
    assert evaluator.output_names == ["logits"] and evaluator.probe_names == ["logits"]
    evaluator = Evaluator(model, samples, "cpu", 8, compared=compared_outputs("rel-l2", names))
    assert evaluator.output_names == ["logits", "h1"] and evaluator.probe_names == ["logits", "h1"]
