"""Extract Silero VAD from its PyPI wheel and build calibration and evaluation feeds from real speech.

Silero VAD (PyPI ``silero-vad``, MIT) ships ``silero_vad/data/silero_vad.onnx`` (opset 16, 2.3 MB): one
``If`` on the sample rate whose branches hold the whole 16 kHz and 8 kHz networks, every Conv (STFT basis,
four encoder convs, the decoder's 1x1 conv) and the LSTM inside a branch, weights as Constant nodes. Its
inputs are an audio chunk ``input`` [batch, 64 + 512] at 16 kHz (the last 64 samples of the previous chunk
as context, as the package's OnnxWrapper feeds it), the recurrent ``state`` [2, batch, 128] and the scalar
``sr``; its outputs the speech probability ``output`` [batch, 1] and the next state ``stateN``.

Audio: the recordings of Debian's ``alsa-utils`` (``/usr/share/sounds/alsa``: a human voice saying
"Front Center", "Front Left", ... at 48 kHz, about 1.4 s each, plus a pink-noise file), resampled to
16 kHz. No PyPI or Debian package found offline holds longer speech. The calibration feeds come from
the Front_*, Rear_* and Noise recordings, the evaluation feeds from Side_Left and Side_Right: different
audio, never seen by the calibration. Each recording is padded with 0.25 s of silence on both sides
(speech onsets and offsets, and the silence a VAD mostly sees) and streamed chunk by chunk through the
original model from a zero state, so each chunk's ``state`` is the one the model really carries there.

Each feed (one .npz in ``models/silero_calib/`` or ``models/silero_eval/``) holds BATCH consecutive chunks
as a batch of independent streams with their states: ``input`` [BATCH, 576] float32, ``state`` [2, BATCH,
128] float32, ``sr`` int64 scalar 16000. A folder of complete feeds because ``sr`` is a scalar and the
state's batch is its axis 1: an .npz stacked on axis 0 cannot hold them. Only the 16 kHz branch runs, so
the compressed model's 8 kHz branch keeps its weights (the report says why).

Run as ``python tools/build_silero.py [--wheel FILE.whl] [--sounds DIR]``: without ``--wheel`` it runs
``pip download --no-deps silero-vad``; without ``--sounds`` it reads ``/usr/share/sounds/alsa`` or
unpacks ``apt-get download alsa-utils``. The .npz members carry fixed timestamps (reruns give the same
bytes for the same package versions).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from math import gcd
from pathlib import Path

import numpy as np
import onnxruntime as ort
from scipy.io import wavfile
from scipy.signal import resample_poly

MODELS = Path(__file__).resolve().parents[1] / "models"
MEMBER = "silero_vad/data/silero_vad.onnx"
RATE, CHUNK, CONTEXT, BATCH = 16000, 512, 64, 8
PAD_SECONDS = 0.25
CALIBRATION = ("Front_Center", "Front_Left", "Front_Right", "Rear_Center", "Rear_Left", "Rear_Right", "Noise")
EVALUATION = ("Side_Left", "Side_Right")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def wheel_path(given: str | None, folder: Path) -> Path:
    if given:
        return Path(given)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(folder), "silero-vad"], check=True)
    return next(folder.glob("silero_vad-*.whl"))


def sounds_folder(given: str | None, folder: Path) -> Path:
    """Where the alsa-utils recordings are: given, installed, or unpacked from the Debian package."""
    for candidate in (given, "/usr/share/sounds/alsa"):
        if candidate and (Path(candidate) / "Front_Center.wav").exists():
            return Path(candidate)
    subprocess.run(["apt-get", "download", "alsa-utils"], cwd=folder, check=True)
    package = next(folder.glob("alsa-utils_*.deb"))
    subprocess.run(["dpkg", "-x", str(package), str(folder / "root")], check=True)
    return folder / "root/usr/share/sounds/alsa"


def audio(path: Path) -> np.ndarray:
    """The recording as float32 in [-1, 1] at RATE, padded with silence."""
    rate, samples = wavfile.read(path)
    signal = samples.astype(np.float64) / 32768.0
    if signal.ndim > 1:
        signal = signal.mean(axis=1)
    common = gcd(rate, RATE)
    signal = resample_poly(signal, RATE // common, rate // common)
    pad = np.zeros(int(PAD_SECONDS * RATE))
    return np.concatenate([pad, signal, pad]).astype(np.float32)


def streamed(session: ort.InferenceSession, signal: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """(input with context, state before it, speech probability) per chunk, from a zero state."""
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros(CONTEXT, np.float32)
    found = []
    for start in range(0, len(signal) - CHUNK + 1, CHUNK):
        chunk = np.concatenate([context, signal[start : start + CHUNK]])[None]
        probability, next_state = session.run(None, {"input": chunk, "state": state, "sr": np.array(RATE, np.int64)})
        found.append((chunk, state, float(probability[0, 0])))
        state, context = next_state, chunk[0, -CONTEXT:]
    return found


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(key + ".npy", date_time=ZIP_DATE)
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.array(value, order="C"), allow_pickle=False)  # keeps 0-d


def write_feeds(folder: Path, chunks: list[tuple[np.ndarray, np.ndarray, float]]) -> int:
    """BATCH chunks a feed (the remainder dropped); returns the number of feeds."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.npz"):
        old.unlink()
    count = len(chunks) // BATCH
    for index in range(count):
        part = chunks[index * BATCH : (index + 1) * BATCH]
        save_npz(folder / f"feed_{index:03d}.npz", input=np.concatenate([c[0] for c in part]),
                 state=np.concatenate([c[1] for c in part], axis=1), sr=np.array(RATE, np.int64))
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", help="a downloaded silero_vad-*.whl")
    parser.add_argument("--sounds", help="a folder holding the alsa-utils recordings (Front_Center.wav, ...)")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        with zipfile.ZipFile(wheel_path(arguments.wheel, folder)) as wheel:
            model_bytes = wheel.read(MEMBER)
        (MODELS / "silero_vad.onnx").write_bytes(model_bytes)
        session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        sounds = sounds_folder(arguments.sounds, folder)
        for name, recordings in (("silero_calib", CALIBRATION), ("silero_eval", EVALUATION)):
            chunks = [chunk for recording in recordings for chunk in streamed(session, audio(sounds / f"{recording}.wav"))]
            speech = np.mean([probability > 0.5 for _, _, probability in chunks])
            feeds = write_feeds(MODELS / name, chunks)
            print(f"{name}: {feeds} feeds of {BATCH} chunks from {len(recordings)} recordings, "
                  f"{speech:.0%} of chunks speech (probability > 0.5)")
    print(f"silero_vad.onnx: {len(model_bytes) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
