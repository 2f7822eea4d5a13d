"""A decoder with a KV cache gets its one-token decode timed (check/decoding.py): the cache inputs and the
outputs that continue them are paired by name, the decode feed continues the first prompt by its most
likely token with the cache the prompt left, and the report of a compression carries both latencies."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnx_lowrank
from onnx_lowrank.check.decoding import cache_pairs, decode_feed
from onnx_lowrank.errors import BoundNotMet

VOCABULARY, WIDTH = 64, 64


def tiny_decoder(seed: int = 0) -> onnx.ModelProto:
    """ids -> embedding -> logits (x @ W); the keys x @ K appended to the cache: present = past ++ keys."""
    rng = np.random.default_rng(seed)
    weights = {"table": rng.standard_normal((VOCABULARY, WIDTH)), "head": rng.standard_normal((WIDTH, VOCABULARY)),
               "keys": rng.standard_normal((WIDTH, WIDTH))}
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["h"], name="embed"),
             helper.make_node("MatMul", ["h", "head"], ["logits"], name="lm_head"),
             helper.make_node("MatMul", ["h", "keys"], ["k"], name="k_proj"),
             helper.make_node("Unsqueeze", ["k", "one"], ["k4"], name="heads"),
             helper.make_node("Concat", ["past_key_values.0.key", "k4"], ["present.0.key"], name="cache", axis=2)]
    graph = helper.make_graph(
        nodes, "decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
         helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", 1, "past", WIDTH])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCABULARY]),
         helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["batch", 1, "total", WIDTH])],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()]
        + [numpy_helper.from_array(np.array([1], np.int64), "one")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def prompts(count: int = 48, length: int = 16, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, VOCABULARY, (count, length)).astype(np.int64),
            "attention_mask": np.ones((count, length), np.int64),
            "past_key_values.0.key": np.zeros((count, 1, 0, WIDTH), np.float32)}


def test_the_cache_is_paired_by_name_and_other_models_have_none():
    assert cache_pairs(tiny_decoder()) == {"past_key_values.0.key": "present.0.key"}
    encoder = tiny_decoder()
    encoder.graph.output[1].name = "keys_out"
    assert cache_pairs(encoder) == {}


def test_the_decode_feed_continues_the_first_prompt_by_one_token():
    model, data = tiny_decoder(), prompts()
    feed = decode_feed(model, data, "cpu")
    assert feed is not None
    assert feed["input_ids"].shape == (1, 1) and feed["attention_mask"].shape == (1, 17)
    assert feed["past_key_values.0.key"].shape == (1, 1, 16, WIDTH)
    table = numpy_helper.to_array(model.graph.initializer[0])
    head = numpy_helper.to_array(model.graph.initializer[1])
    assert feed["input_ids"][0, 0] == np.argmax(table[data["input_ids"][0, -1]] @ head)


def test_a_compressed_decoder_reports_prompt_and_decode_latency():
    _, report = onnx_lowrank.compress(tiny_decoder(), calibration=prompts(), quantize="int4", tolerance=0.05,
                                      metric="rel-l2", objective="size")
    assert report.latency is not None and report.latency.batch is not None and report.latency.batch > 1
    decode = report.decode_latency
    assert decode is not None and decode.batch == 1 and decode.speedup is not None
    assert report.to_dict()["decode_latency"]["batch"] == 1


def test_balanced_times_a_decoders_layers_at_one_token_decode():
    """Under --objective balanced a decoder's layers are timed at its one-token decode (batch 1: what it is
    used for) and the report says so; another model's are timed at its prompts, with no such note."""
    def timed_at_decode(model):
        try:
            _, report = onnx_lowrank.compress(model, calibration=prompts(), quantize="int4", tolerance=0.05,
                                              metric="rel-l2", objective="balanced")
        except BoundNotMet as refused:  # 64 x 64 layers: the timings may leave no option within the bound
            report = refused.report
        return any("timed at one-token decode (batch 1)" in note for note in report.notes)

    assert timed_at_decode(tiny_decoder())
    encoder = tiny_decoder()
    encoder.graph.output[1].name = "keys_out"
    encoder.graph.node[-1].output[0] = "keys_out"
    assert not timed_at_decode(encoder)
