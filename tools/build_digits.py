"""Build a small trained CNN, with labelled data, for checking low-rank factorization end to end.

The other models in ``models/`` come without labelled data, so the accuracy a
factorization costs cannot be measured on them.  This script trains, offline
and deterministically, a small convolutional classifier on scikit-learn's
bundled 8x8 digits data set (no download) and writes:

* ``digits_cnn.onnx``: the CNN (opset 17, input ``image`` float32
  [batch, 1, 8, 8], output ``logits`` [batch, 10]); its Conv and Gemm layers
  hold most of the parameters, so there is something to compress.
* ``digits_calib.npz`` / ``digits_calib_labels.npy``: the calibration split
  (npz key ``image``, the model's input name, so it can be fed directly).
* ``digits_eval.npz`` / ``digits_eval_labels.npy``: the held-out evaluation
  split, never seen in training or calibration.

Run as ``python tools/build_digits.py`` (needs ``scikit-learn``).  Seeds are
fixed, training runs on one thread with deterministic algorithms, and the npz
files are written without timestamps, so a rerun with the same package
versions reproduces the files byte for byte.
"""

import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from torch import nn

OUT_DIR = Path(__file__).resolve().parents[1] / "models"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
OPSET = 17
SEED = 0
TRAIN_FRACTION = 0.6
CALIB_FRACTION = 0.2  # the evaluation split is the remaining ~20%
EPOCHS = 30
BATCH_SIZE = 32
LEARNING_RATE = 1e-3
MIN_EVAL_ACCURACY = 0.97
TOLERANCE = 1e-4  # max abs difference allowed between torch and onnxruntime logits
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamp of the npz members


def make_deterministic():
    """Fix every seed and force single-threaded, deterministic torch kernels."""
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def load_splits():
    """Return ``{"train"|"calib"|"eval": (images, labels)}`` from sklearn's digits.

    Images are float32 (N, 1, 8, 8) scaled from 0..16 to [0, 1], labels int64.
    The samples are shuffled once with a seeded permutation; the first 60% train,
    the next 20% calibrate, the rest evaluate.
    """
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(labels))
    images, labels = images[order], labels[order]
    n_train = int(TRAIN_FRACTION * len(labels))
    n_calib = int(CALIB_FRACTION * len(labels))
    bounds = {"train": (0, n_train), "calib": (n_train, n_train + n_calib), "eval": (n_train + n_calib, len(labels))}
    return {name: (images[a:b], labels[a:b]) for name, (a, b) in bounds.items()}


def build_model():
    """Return the untrained CNN: three 3x3 convolutions and two linear layers."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 2 * 2, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def train(model, images, labels):
    """Train ``model`` in place with Adam and cross-entropy for ``EPOCHS`` epochs."""
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for epoch in range(EPOCHS):
        order = torch.randperm(len(y), generator=generator)
        total = 0.0
        for start in range(0, len(y), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        if epoch % 10 == 9 or epoch == EPOCHS - 1:
            print(f"epoch {epoch + 1:2d}: train loss {total / len(y):.4f}")
    model.eval()


def torch_logits(model, images):
    """Return ``model``'s logits for ``images`` as a numpy array."""
    with torch.no_grad():
        return model(torch.from_numpy(images)).numpy()


def export_onnx(model, path):
    """Export ``model`` with a dynamic batch axis to one self-contained ONNX file and validate it."""
    torch.onnx.export(
        model,
        (torch.zeros(2, 1, 8, 8),),
        path,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        opset_version=OPSET,
        dynamo=False,
    )
    proto = onnx.load(path, load_external_data=False)
    assert not any(
        onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer
    ), "weights must be stored inside the .onnx file"
    onnx.checker.check_model(proto, full_check=True)
    return proto


def save_npz(path, **arrays):
    """Write an uncompressed ``.npz`` like ``np.savez``, but with fixed member timestamps.

    ``np.savez`` stamps each member with the current time, so two runs would
    give different bytes; ``np.load`` reads this file the same way.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(key + ".npy", date_time=ZIP_DATE)
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(value), allow_pickle=False)


def save_split(images, labels, stem):
    """Write ``<stem>.npz`` (key ``INPUT_NAME``) and ``<stem>_labels.npy``; return both paths."""
    npz_path, labels_path = OUT_DIR / f"{stem}.npz", OUT_DIR / f"{stem}_labels.npy"
    save_npz(npz_path, **{INPUT_NAME: images})
    np.save(labels_path, labels)
    return npz_path, labels_path


def check_onnx(path, model, splits):
    """Check onnxruntime against torch on the calibration and evaluation splits.

    The npz files written to disk are fed as they are.  Returns
    ``{split: accuracy}`` from onnxruntime; asserts that logits agree within
    ``TOLERANCE`` and that predictions, hence accuracies, are identical.
    """
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    accuracies = {}
    for name in ("calib", "eval"):
        feed = dict(np.load(OUT_DIR / f"digits_{name}.npz"))
        labels = np.load(OUT_DIR / f"digits_{name}_labels.npy")
        expected_images, expected_labels = splits[name]
        assert np.array_equal(feed[INPUT_NAME], expected_images) and np.array_equal(labels, expected_labels)
        got = session.run([OUTPUT_NAME], feed)[0]
        expected = torch_logits(model, feed[INPUT_NAME])
        err = float(np.abs(got - expected).max())
        assert err <= TOLERANCE, f"{name}: max abs diff {err:.2e} > {TOLERANCE}"
        onnx_pred, torch_pred = got.argmax(1), expected.argmax(1)
        assert np.array_equal(onnx_pred, torch_pred), f"{name}: onnxruntime and torch predictions differ"
        accuracies[name] = float((onnx_pred == labels).mean())
        print(
            f"{name}: {len(labels)} samples, accuracy onnxruntime {accuracies[name]:.4f}"
            f" = torch {float((torch_pred == labels).mean()):.4f}, max abs logit diff {err:.2e}"
        )
    return accuracies


def report(proto, paths):
    """Print the model's parameter count, its op-type counts and every written file's size."""
    params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    print(f"parameters: {params:,} in {len(proto.graph.initializer)} initializers")
    ops = Counter(node.op_type for node in proto.graph.node)
    print("op types: " + ", ".join(f"{op} {count}" for op, count in sorted(ops.items())))
    for path in paths:
        print(f"{path.relative_to(OUT_DIR.parent)}: {path.stat().st_size:,} bytes")


def main():
    """Train, export and check the digits CNN, write its data splits and report."""
    started = time.perf_counter()
    make_deterministic()
    OUT_DIR.mkdir(exist_ok=True)
    splits = load_splits()
    print("splits: " + ", ".join(f"{name} {len(y)}" for name, (_, y) in splits.items()))

    model = build_model()
    train(model, *splits["train"])
    eval_accuracy = float((torch_logits(model, splits["eval"][0]).argmax(1) == splits["eval"][1]).mean())
    assert eval_accuracy >= MIN_EVAL_ACCURACY, f"eval accuracy {eval_accuracy:.4f} < {MIN_EVAL_ACCURACY}"

    onnx_path = OUT_DIR / "digits_cnn.onnx"
    proto = export_onnx(model, onnx_path)
    data_paths = [path for name in ("calib", "eval") for path in save_split(*splits[name], f"digits_{name}")]
    check_onnx(str(onnx_path), model, splits)
    report(proto, [onnx_path, *data_paths])
    print(f"runtime: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
