"""all-MiniLM-L6-v2 in compact mode (cosine 0.01) validated on the output a sentence-embedding deployment
reads (`--outputs sentence_embedding`) against every output, per objective: parameters kept, the mean
cosine similarity of the sentence embeddings on the 256 evaluation sentences the tool never saw, and CPU
latency at batch 32 timed side by side with the original (one interleaved run). Needs
`python tools/real_models.py minilm` (cache/). Prints one JSON line per row."""

from __future__ import annotations

import collections
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import onnx_lowrank  # noqa: E402
from onnx_lowrank.check.latency import time_side_by_side

CACHE = Path(__file__).resolve().parents[1] / "cache"
ROWS = (("sentence_embedding", "size"), ("sentence_embedding", "balanced"))  # every output: BENCHMARKS.md "minilm"


def embeddings(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["sentence_embedding"], {k: v[i:i + 32] for k, v in feeds.items()})[0]
                           for i in range(0, len(feeds["input_ids"]), 32)])


def main() -> None:
    original = onnx.load(CACHE / "minilm.onnx")
    with np.load(CACHE / "minilm_eval.npz") as data:
        feeds = {name: data[name] for name in data.files}
    reference = embeddings(original, feeds)
    models = [original]
    for outputs, objective in ROWS:
        started = time.perf_counter()
        model, report = onnx_lowrank.compress(original, str(CACHE / "minilm_calib.npz"), metric="cosine",
                                              tolerance=0.01, batch_size=32, objective=objective,
                                              outputs=[outputs] if outputs else None)
        got = embeddings(model, feeds)
        cosine = np.sum(reference * got, 1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(got, axis=1))
        models.append(model)
        print(json.dumps({"outputs": outputs or "every", "objective": objective, "kept": report.params_after / report.params_before,
                          "params_after": report.params_after, "held_out": report.validation.value,
                          "bound": report.validation.unseen_bound, "eval_mean_cosine": float(cosine.mean()),
                          "eval_min_cosine": float(cosine.min()), "seconds": time.perf_counter() - started,
                          "methods": dict(collections.Counter(layer.method for layer in report.layers))}), flush=True)
    feed = {name: value[:32] for name, value in feeds.items()}
    timings = time_side_by_side(models, feed, "cpu", threads=2, min_runs=30, min_seconds=10.0)
    base = timings[0].median_ms
    print(json.dumps({"median_ms": [t.median_ms for t in timings], "speedup": [base / t.median_ms for t in timings]}))


if __name__ == "__main__":
    main()
