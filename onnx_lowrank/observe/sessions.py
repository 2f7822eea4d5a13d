"""ONNX Runtime sessions on the chosen execution provider, with graph optimizations disabled so that the
compared models run exactly the graphs that were written."""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnxruntime as ort

from ..errors import InputError
from ..graph.bodies import all_graphs
from ..graph.bodies import node_bodies as subgraphs
from ..graph.model_io import save_model, serialized_or_none
from ..system.installation import install_hint

PROVIDERS = ("cpu", "cuda", "auto")
EXECUTION_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def resolve_provider(name: str) -> str:
    """"cpu" or "cuda": `auto` takes CUDA when this onnxruntime has it; `cuda` without it warns and uses CPU."""
    if name not in PROVIDERS:
        raise InputError(f"unknown provider {name!r}; choose one of {', '.join(PROVIDERS)}")
    has_cuda = EXECUTION_PROVIDERS["cuda"] in ort.get_available_providers()
    if name == "cuda" and not has_cuda:
        warnings.warn(
            "CUDA was asked for but this onnxruntime has no CUDAExecutionProvider "
            f"({install_hint('gpu')}); validating on the CPU instead",
            RuntimeWarning,
            stacklevel=2,
        )
        return "cpu"
    if name == "auto":
        return "cuda" if has_cuda else "cpu"
    return name


def open_session(
    model: onnx.ModelProto, provider: str, threads: int, level: ort.GraphOptimizationLevel, base_dir: str = "",
    optimized_to: Path | None = None,
) -> ort.InferenceSession:
    """An onnxruntime session of the model, the one way every module opens one: CUDA first when `provider`
    is "cuda", `threads` intra-op threads (0: onnxruntime's default); models over 2 GB, and models whose
    external data still lies in their files under `base_dir`, go through a temporary file with external
    data. `optimized_to`: where ONNX Runtime writes the graph it runs after its optimizations (its
    initializers to a side file beside it)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if optimized_to is not None:
        options.optimized_model_filepath = str(optimized_to)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         optimized_to.stem + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    providers = [EXECUTION_PROVIDERS["cuda"], EXECUTION_PROVIDERS["cpu"]] if provider == "cuda" else [EXECUTION_PROVIDERS["cpu"]]
    serialized = None if base_dir else serialized_or_none(model)
    if serialized is not None:
        return ort.InferenceSession(serialized, options, providers=providers)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        save_model(model, path, external_data=True, base_dir=base_dir)
        return ort.InferenceSession(str(path), options, providers=providers)


class Session:
    """An inference session of a model on a provider; reports the provider that really runs it.

    `source` names a model that came from the user (the input, with extra outputs): ONNX Runtime failing
    to load or run it is bad input (InputError), not a bug of ours.
    """

    def __init__(self, model: onnx.ModelProto, provider: str, threads: int = 0, source: str | None = None):
        self.source = source
        with self._blame():
            self._open(model, provider, threads)

    def _open(self, model: onnx.ModelProto, provider: str, threads: int) -> None:
        self._session = open_session(model, provider, threads, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        used = self._session.get_providers()[0]
        self.provider = "cuda" if used == EXECUTION_PROVIDERS["cuda"] else "cpu"
        if provider == "cuda" and self.provider != "cuda":
            warnings.warn("the CUDA execution provider failed to start; running on the CPU", RuntimeWarning, stacklevel=2)
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, feed: dict, outputs: list[str] | None = None) -> list:
        with self._blame():
            return self._session.run(outputs, feed)

    @contextlib.contextmanager
    def _blame(self):
        if self.source is None:
            yield
            return
        try:
            yield
        except (InputError, MemoryError, KeyboardInterrupt):
            raise
        except Exception as error:  # onnxruntime's own exception types (Fail, InvalidGraph, ...)
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise InputError(f"onnxruntime cannot run {self.source}: {first_line}") from None


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """The model (changed in place) with `names` among its graph outputs."""
    existing = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in existing)
    return model


def prefix(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """The part of the model that computes `names` (tensors of its main graph), its only outputs: the nodes
    they depend on and the initializers those read; every real graph input stays, so the model's feeds run
    it. ONNX Runtime runs every node of a graph whatever outputs are asked for, so a pass that needs early
    tensors of a large model costs only the layers before them. The initializers are copied.
    (onnx.utils.Extractor needs declared shapes for the outputs, which exports often lack, and misses what
    If / Loop / Scan bodies read from the outer graph.)"""
    graph, needed = model.graph, set(names)
    kept = []
    for node in reversed(graph.node):  # topologically sorted: a node's readers come after it
        if needed.isdisjoint(node.output):
            continue
        kept.append(node)
        needed.update(node.input)
        needed.update(name for body in subgraphs(node) for inner in all_graphs(body)  # outer-scope reads
                      for reader in inner.node for name in reader.input)
    stored = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    part = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name, domain=model.domain)
    part.opset_import.extend(model.opset_import)
    part.functions.extend(model.functions)
    part.graph.name = graph.name
    part.graph.node.extend(reversed(kept))
    part.graph.input.extend(i for i in graph.input if i.name not in stored or i.name in needed)
    part.graph.output.extend(onnx.ValueInfoProto(name=name) for name in dict.fromkeys(names))
    part.graph.initializer.extend(t for t in graph.initializer if t.name in needed)
    part.graph.sparse_initializer.extend(t for t in graph.sparse_initializer if t.values.name in needed)
    part.graph.value_info.extend(v for v in graph.value_info if v.name in needed)
    return part


def session_with_outputs(model: onnx.ModelProto, names: Sequence[str], provider: str,
                         source: str | None = None) -> Session:
    """A session of the model with `names` among its outputs; the model is left as it was (no copy: a
    large model is not held twice). `source`: as for Session."""
    count = len(model.graph.output)
    try:
        return Session(with_outputs(model, names), provider, source=source)
    finally:
        del model.graph.output[count:]
