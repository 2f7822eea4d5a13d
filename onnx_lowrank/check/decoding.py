"""One-token decode of a decoder with a KV cache, the feed its latency is timed on: a decoder is used
token by token after its prompt, and that step (batch 1, one new token against the cache) is what its
users wait for, not the prompt's. A decoder is recognised by the usual export's names (Hugging Face
Optimum, torch.onnx of transformers): cache inputs `past_key_values.*` (or `past.*`) that the outputs
`present.*` of the same suffix continue, and an `input_ids` input."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort

from ..observe.sessions import open_session

PAST_PREFIXES = ("past_key_values.", "past.")
PRESENT_PREFIX = "present."


def cache_pairs(model: onnx.ModelProto) -> dict[str, str]:
    """Each cache input of a decoder and the output that continues it; empty for any other model."""
    inputs = {value.name for value in model.graph.input}
    outputs = {value.name for value in model.graph.output}
    pairs = {}
    for name in inputs:
        prefix = next((prefix for prefix in PAST_PREFIXES if name.startswith(prefix)), None)
        if prefix is not None:
            pairs[name] = PRESENT_PREFIX + name[len(prefix):]
    if not pairs or "input_ids" not in inputs or any(present not in outputs for present in pairs.values()):
        return {}
    return pairs


def decode_feed(model: onnx.ModelProto, prompt: Mapping[str, np.ndarray], provider: str) -> dict | None:
    """The feed of one next token at batch 1 after the first prompt of `prompt` (its cache filled by running
    it): the most likely token, the attention mask one longer, the cache the prompt left. None when the
    model is no decoder with a KV cache or its outputs do not fit that reading."""
    pairs = cache_pairs(model)
    if not pairs:
        return None
    first = {name: np.asarray(value)[:1] for name, value in prompt.items()}
    session = open_session(model, provider, 0, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    names = [value.name for value in session.get_outputs()]
    ran = dict(zip(names, session.run(None, first)))
    logits, ids = ran[names[0]], first["input_ids"]
    if np.ndim(logits) != 3 or np.ndim(ids) != 2:
        return None
    feed = dict(first)
    feed["input_ids"] = np.argmax(logits[:, -1], axis=-1).astype(ids.dtype)[:, None]
    if "attention_mask" in first:
        mask = first["attention_mask"]
        feed["attention_mask"] = np.concatenate([mask, np.ones((1, 1), mask.dtype)], axis=1)
    for past, present in pairs.items():
        feed[past] = ran[present]
    return feed
