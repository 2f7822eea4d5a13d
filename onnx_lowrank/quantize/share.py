"""`--quantize int8` around the search: the tolerance shared between quantization and factorization."""

from __future__ import annotations

import onnx

from ..check.evaluator import Evaluator
from ..check.metrics import DISCRETE
from ..errors import known
from ..graph.model_io import model_stats
from ..observe.calibration import Samples, Split
from ..report import FallbackSearch, FallbackStep, Quantization
from .fallback import FALLBACK_SHARE, Fallback, chain_names, fallback
from .int8 import quantize_int8


class Int8Share:
    """`--quantize int8` around the search. In compact mode the tolerance is shared: quantizing the
    original alone costs some error, the factorization is searched within what is left, and the two
    together are validated; should they add up to more than the tolerance, the factorization's share is
    halved (twice at most), then only the quantized original remains.

    When int8 of the original alone takes more than FALLBACK_SHARE of the tolerance, the nodes whose
    dynamic quantization costs the most (measured: quantize.fallback) are quantized weight-only instead
    (MatMul, Gemm) or kept float (Gather, Conv) until it takes at most that, in the original and in the
    factorized model (the low-rank chain that replaced such a node is treated alike). Their cost is
    measured on fit samples, the held-out part checks each step."""

    RETRIES = 2
    SELECT_SAMPLES = 32  # fit samples each node's cost is measured on

    def __init__(self, metric: str, int8_range: str, batch_size: int, samples: Samples | None, parts: Split | None,
                 evaluator: Evaluator | None, original: onnx.ModelProto):
        self.metric = metric
        self.range = int8_range  # "auto": by this CPU (quantize.int8_range_for)
        # Conv needs calibration for its activations' scales; without data it stays float
        self.feeds = None if samples is None else [
            feed for _, feed in samples.batches(known(parts, "the calibration split").fit, batch_size)]
        self.evaluator = evaluator  # None without calibration data: nothing is measured
        self.held_out = [] if parts is None else list(parts.validation)
        self.labels = None if samples is None else samples.labels
        self.original = original
        self.alone_error: float | None = None
        self.info: dict = {}
        self.retries = self.RETRIES
        self.fallback: Fallback | None = None
        self.floats: tuple[str, ...] = ()  # original node names kept float
        self.weight_only: tuple[str, ...] = ()  # ... and quantized weight-only
        self.select_indices = [] if parts is None else list(parts.fit[: self.SELECT_SAMPLES])

    def quantize(self, model: onnx.ModelProto) -> onnx.ModelProto:
        quantized = quantize_int8(model, self.feeds, int8_range=self.range, exclude=chain_names(model, self.floats),
                                  weight_only=chain_names(model, self.weight_only))
        self.info = quantized.info
        return quantized.model

    def error(self, model: onnx.ModelProto) -> float:
        evaluator = known(self.evaluator, "the evaluator")  # int8 errors are measured with calibration data
        labels = None if self.labels is None else self.labels[self.held_out]
        return evaluator.judge(model, self.held_out, self.metric, labels).value

    def select(self, model: onnx.ModelProto) -> float:
        """A node's cost, on fit samples (the held-out ones check): the metric, or for top1 and accuracy,
        too coarse on a few samples, the squared relative error of the logits (the sensitivity probe's)."""
        if self.metric in DISCRETE:
            probing = onnx.ModelProto()
            probing.CopyFrom(model)  # probe_error adds outputs; the fallback builds on this model
            return known(self.evaluator, "the evaluator").probe_error(probing, self.select_indices)
        return known(self.evaluator, "the evaluator").error(model, self.select_indices, self.metric)

    def factor_share(self, tolerance: float) -> float | None:
        """What the tolerance leaves the factorization once the original's own int8 error is spent, after
        taking out of dynamic int8 the nodes that cost the most when int8 alone takes more than its share
        (None: nothing)."""
        self.fallback = fallback(self.original, tolerance * FALLBACK_SHARE, self.error,
                                 self.select if self.select_indices else None, self.feeds, int8_range=self.range)
        self.floats, self.weight_only = self.fallback.floats, self.fallback.weight_only
        self.alone_error = self.fallback.error
        left = tolerance - self.alone_error
        return left if left > 0 or (left == 0 and self.metric == "accuracy") else None

    def halved(self, share: float | None) -> float | None:
        """The factorization's share halved, after the two errors together came out above the tolerance
        (None once the retries are spent: only the quantized original remains)."""
        self.retries -= 1
        if share is None or self.retries < 0 or share == 0:
            return None
        return share / 2

    def summary(self, factorized, quantized, factor_error: float | None, error: float | None) -> Quantization:
        fallback = self.fallback  # compact mode: the nodes taken out, each with its measured cost
        return Quantization(
            scheme="int8",
            bytes_factorized=model_stats(factorized).bytes,
            bytes_quantized=model_stats(quantized).bytes,
            error_factorized=factor_error,  # the factorization alone (validated, before quantizing)
            error_quantized=error,  # factorization and quantization together: what was validated
            error_quantized_alone=self.alone_error,  # the original quantized (with the fallback), no factorization
            nodes=self.info,
            range=self.info["range"],  # full or reduced (7-bit weights)
            range_reason=self.info["range_reason"],  # auto: which CPU feature decided; or requested
            fallback_nodes=None if fallback is None else [FallbackStep(**node.to_dict()) for node in fallback.nodes],
            fallback=None if fallback is None else FallbackSearch(**fallback.to_dict()),
        )
