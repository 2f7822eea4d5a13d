"""Compare a compressed Silero VAD with the original on the evaluation feeds of tools/build_silero.py.

Two views, printed side by side:
* per chunk, as validated: each model fed the chunk and the state the original carried there; per output
  (speech probability, next state) the relative L2 error and the largest absolute difference;
* streaming, as a VAD runs: the audio of the feeds (chunks in order, a zero state where a recording
  starts) run chunk by chunk, each model carrying its own state, so errors feed back; the largest
  probability difference and the speech decisions (probability > 0.5) that change.
And each model's time per chunk (median of the streaming runs, one thread).

Run as ``python tools/eval_silero.py COMPRESSED.onnx [--original models/silero_vad.onnx]
[--feeds models/silero_eval]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

MODELS = Path(__file__).resolve().parents[1] / "models"
THRESHOLD = 0.5


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def chunks(folder: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(input [1, 576], state [2, 1, 128], sr) per chunk, in stream order."""
    found = []
    for path in sorted(folder.glob("*.npz")):
        with np.load(path) as feed:
            for row in range(feed["input"].shape[0]):
                found.append((feed["input"][row : row + 1], feed["state"][:, row : row + 1], feed["sr"]))
    return found


def per_chunk(original: ort.InferenceSession, compressed: ort.InferenceSession, folder: Path) -> None:
    feeds = [dict(np.load(path)) for path in sorted(folder.glob("*.npz"))]
    for position, name in enumerate(("output", "stateN")):
        before = np.concatenate([original.run(None, feed)[position].reshape(-1) for feed in feeds]).astype(np.float64)
        after = np.concatenate([compressed.run(None, feed)[position].reshape(-1) for feed in feeds])
        print(f"per chunk   {name:7s} rel-l2 {np.linalg.norm(after - before) / np.linalg.norm(before):.4f}  "
              f"max-abs {np.max(np.abs(after - before)):.4f}")


def streamed(model: ort.InferenceSession, stream: list) -> tuple[np.ndarray, float]:
    """Probabilities over the stream with the model's own state, and the median ms per chunk."""
    probabilities, times, state = [], [], None
    for chunk, stored_state, rate in stream:
        if state is None or not stored_state.any():  # a recording starts
            state = np.zeros_like(stored_state)
        started = time.perf_counter()
        probability, state = model.run(None, {"input": chunk, "state": state, "sr": rate})
        times.append(time.perf_counter() - started)
        probabilities.append(float(probability[0, 0]))
    return np.array(probabilities), 1e3 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compressed", type=Path)
    parser.add_argument("--original", type=Path, default=MODELS / "silero_vad.onnx")
    parser.add_argument("--feeds", type=Path, default=MODELS / "silero_eval")
    arguments = parser.parse_args()
    original, compressed = session(arguments.original), session(arguments.compressed)
    per_chunk(original, compressed, arguments.feeds)
    stream = chunks(arguments.feeds)
    before, before_ms = streamed(original, stream)
    after, after_ms = streamed(compressed, stream)
    flipped = int(np.sum((before > THRESHOLD) != (after > THRESHOLD)))
    print(f"streaming   {len(stream)} chunks: max-abs probability {np.max(np.abs(after - before)):.4f}, "
          f"mean-abs {np.mean(np.abs(after - before)):.4f}, decisions changed {flipped} "
          f"(of {int(np.sum(before > THRESHOLD))} speech chunks)")
    print(f"time/chunk  {before_ms:.3f} ms -> {after_ms:.3f} ms")


if __name__ == "__main__":
    main()
