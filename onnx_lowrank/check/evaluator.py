"""Running candidate models on calibration samples and scoring them against the original: the validated
error of a candidate (`Judged`, and a search's `Trial`), for top1 / accuracy with the calibration decisions it
threatens, and the probe errors the sensitivities are measured with."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import InputError
from ..factorize.menu import Choice
from ..observe.calibration import Samples
from ..observe.sessions import Session, session_with_outputs, with_outputs
from .generalization import Decisions, Threat, bootstrap, clopper_pearson, decisions, margins_for, threat
from .metrics import DISCRETE, Outputs, lost_decisions, score
from .overrides import Override, with_overridable

SATURATING = ("Softmax", "LogSoftmax", "Sigmoid")


def probe_outputs(model: onnx.ModelProto) -> list[str]:
    """The tensors sensitivity is measured on: each graph output, or the input of the Softmax /
    LogSoftmax / Sigmoid it comes from through Identity nodes (saturated probabilities hardly move while
    logits do)."""
    producers = {name: node for node in model.graph.node for name in node.output}
    names = []
    for output in model.graph.output:
        name = output.name
        while name in producers and producers[name].op_type == "Identity":
            name = producers[name].input[0]
        node = producers.get(name)
        names.append(node.input[0] if node is not None and node.op_type in SATURATING else output.name)
    return names


@dataclass(frozen=True)
class Judged:
    """A candidate's validated error and, for top1 / accuracy, its margin analysis (generalization.py)."""

    error: float
    threat: Threat | None = None
    lost: tuple[int, int] | None = None  # top1 / accuracy: decisions lost, of decisions made (held-out)
    bound: float | None = None  # the upper confidence bound for new inputs, where asked (--accept bound)

    @property
    def value(self) -> float:
        """What the search holds within the tolerance: the error seen (for top1 / accuracy, less the
        held-out near-ties lost where they are exempt), or the fraction of calibration decisions threatened
        when that is larger."""
        if self.threat is None or self.lost is None:
            return self.error
        lost, total = self.lost
        counted = lost - (self.threat.ties_lost if self.threat.exempt else 0)
        return max(counted / max(total, 1), self.threat.predicted)


class Evaluator:
    """Runs candidates on calibration samples and scores them against the original's outputs: the graph
    outputs for validation, the probe tensors (logits rather than probabilities) for sensitivity."""

    def __init__(self, original: onnx.ModelProto, samples: Samples, provider: str, batch_size: int,
                 overrides: dict[str, Override] | None = None, compared: Sequence[str] | None = None,
                 decisions: dict[str, Decisions] | None = None, exempt_ties: bool = True,
                 bound_confidence: float | None = None):
        """`decisions`: the original's, by tensor name, where another evaluator found them already;
        `exempt_ties`: top1 / accuracy near-ties are not held against the tolerance (--ties);
        `bound_confidence`: judge() gives each candidate's bound for new inputs (--accept bound)."""
        self.samples = samples
        self.batch_size = batch_size
        self.provider = provider
        self.overrides = overrides or {}  # by unit key: how to probe the unit in the original's session
        every = [o.name for o in original.graph.output]
        # the graph outputs the metric reads (perplexity: the logits alone, not a KV cache), every one by
        # default; sensitivity is probed on the same ones
        self.output_names = list(compared) if compared else every
        probes = dict(zip(every, probe_outputs(original)))
        self.probe_names = [probes[name] for name in self.output_names]
        probing = onnx.ModelProto()
        probing.CopyFrom(original)  # the extra outputs and inputs must not leak into the caller's model
        with_overridable(probing, self.overrides.values())
        self._original = Session(with_outputs(probing, self.probe_names), provider, source="the input model")
        self.provider_used = self._original.provider
        self._references: dict[tuple, dict[int, list[np.ndarray]]] = {}  # by output names, per sample
        self._decisions: dict[str, Decisions] = dict(decisions or {})
        self._last: tuple[Hashable, dict[int, list[np.ndarray]]] | None = None  # a candidate's outputs per sample
        self.exempt_ties = exempt_ties
        self.bound_confidence = bound_confidence

    def outputs(self, session: Session, indices: Sequence[int], names: list[str], fed: dict | None = None) -> Outputs:
        """Per named tensor, per sample: its values (rows along axis 0 when the samples are stacked);
        `fed`: overridden initializers, fed with every batch."""
        collected: Outputs = [[] for _ in names]
        for chunk, feed in self.samples.batches(list(indices), self.batch_size):
            for store, value in zip(collected, session.run({**feed, **(fed or {})}, names)):
                if self.samples.batched and value.ndim and value.shape[0] == len(chunk):
                    store.extend(np.split(value, len(chunk)))
                else:
                    store.append(value)
        return collected

    def reference(self, indices: Sequence[int], names: list[str]) -> Outputs:
        """The original's outputs, each sample run once."""
        def finite(found: Outputs) -> None:
            for name, values in zip(names, found):
                if any(v.dtype.kind == "f" and not np.isfinite(v).all() for v in values):
                    raise InputError(f"the input model computes NaN or Inf in {name!r} on the calibration data")

        known = self._references.setdefault(tuple(names), {})
        return self._per_sample(known, indices, names, lambda: self._original, finite)

    def _per_sample(self, known: dict[int, list[np.ndarray]], indices: Sequence[int], names: list[str],
                    open_session: Callable[[], Session], check: Callable[[Outputs], None] | None = None) -> Outputs:
        """`outputs` on `indices`, run only on the samples `known` lacks (it gains them) where a run gives
        one value per sample; `check` sees what was run."""
        missing = [index for index in indices if index not in known]
        if missing:
            found = self.outputs(open_session(), missing, names)
            if check is not None:
                check(found)
            if any(len(values) != len(missing) for values in found):  # not per sample: nothing is ever known
                return found
            known.update({index: [values[p] for values in found] for p, index in enumerate(missing)})
        return [[known[index][n] for index in indices] for n in range(len(names))]

    def error(self, model: onnx.ModelProto, indices: Sequence[int], metric: str, labels=None) -> float:
        """The metric over the graph outputs of a candidate."""
        candidate = self.outputs(Session(model, self.provider), indices, self.output_names)
        return score(metric, self.reference(indices, self.output_names), candidate, labels)

    def judge(self, model: onnx.ModelProto, indices: Sequence[int], metric: str, labels=None,
              candidate: Hashable | None = None) -> Judged:
        """The metric and, for top1 / accuracy, how many calibration decisions the candidate threatens,
        from one run on the held-out samples (the model is left as it was). `candidate`: what the model
        was built from; the last candidate judged under the same key is not run again on the samples it
        already ran on (compact mode confirms on every held-out sample what half of them selected)."""
        confidence = self.bound_confidence
        if metric not in DISCRETE:
            found = self._candidate_outputs(lambda: Session(model, self.provider), indices, self.output_names,
                                            candidate)
            reference = self.reference(indices, self.output_names)
            bound = None if confidence is None else bootstrap(metric, reference, found, confidence, labels=labels)
            return Judged(score(metric, reference, found, labels), bound=bound)
        names = self.decision_names(metric)
        found = self._candidate_outputs(lambda: session_with_outputs(model, names, self.provider), indices,
                                        self.output_names + names, candidate)
        outputs, logits = found[: len(self.output_names)], found[len(self.output_names) :]
        lost, total = lost_decisions(metric, self.reference(indices, self.output_names), outputs, labels)
        threats = [self.threat(indices, name, after, labels) for name, after in zip(names, logits)]
        bound = None if confidence is None else clopper_pearson(lost, total, confidence)
        return Judged(lost / max(total, 1), max(threats, key=lambda t: t.predicted), (lost, total), bound)

    def _candidate_outputs(self, open_session: Callable[[], Session], indices: Sequence[int], names: list[str],
                           candidate: Hashable | None) -> Outputs:
        """`outputs` of a candidate; those of the samples the last candidate of the same key ran on are kept."""
        key = (candidate, tuple(names))
        if candidate is None or self._last is None or self._last[0] != key:
            self._last = None if candidate is None else (key, {})
        return self._per_sample({} if self._last is None else self._last[1], indices, names, open_session)

    def decision_names(self, metric: str) -> list[str]:
        """The tensors whose margins decide: per float graph output (accuracy: the first), its logits (the
        input of its Softmax) when they have the output's shape, else the output itself."""
        first = [0]
        outputs = self.reference(first, self.output_names)
        logits = self.reference(first, self.probe_names)
        names = [probe if logit[0].shape == o[0].shape else output
                 for output, probe, o, logit in zip(self.output_names, self.probe_names, outputs, logits)
                 if o and o[0].dtype.kind == "f"]
        return names[:1] if metric == "accuracy" else names

    def threat(self, indices: Sequence[int], name: str, after: list[np.ndarray], labels=None) -> Threat:
        """The calibration decisions threatened by a candidate whose `name` tensor on the held-out
        `indices` is `after` (generalization.threat)."""
        everything = self.decisions(name)
        before = self.reference(indices, [name])[0]
        classes = decisions(before, labels).classes
        return threat(everything, margins_for(before, classes), margins_for(after, classes), self.exempt_ties)

    def decisions(self, name: str) -> Decisions:
        """The original's decisions on every calibration sample, fit part included."""
        if name not in self._decisions:  # the logits themselves are not kept: only margins and classes
            every = list(range(len(self.samples)))
            self._decisions[name] = decisions(self.outputs(self._original, every, [name])[0], self.samples.labels)
        return self._decisions[name]

    def probe_error(self, model: onnx.ModelProto, indices: Sequence[int]) -> float:
        """Squared relative L2 error of the probe tensors of a candidate (changed in place)."""
        session = Session(with_outputs(model, self.probe_names), self.provider)
        candidate = self.outputs(session, indices, self.probe_names)
        return score("rel-l2", self.reference(indices, self.probe_names), candidate) ** 2

    def probe_error_fed(self, fed: dict[str, np.ndarray], indices: Sequence[int]) -> float:
        """The same for the original fed other values of its overridable initializers (overrides.py)."""
        reference = self.reference(indices, self.probe_names)  # the input model as it is: a failure is the user's
        try:
            candidate = self.outputs(self._original, indices, self.probe_names, fed)
        except InputError as error:  # the same session fed our values: a failure is ours, not bad input
            raise RuntimeError(f"{error} (fed a probe's overridden initializers)") from error
        return score("rel-l2", reference, candidate) ** 2


@dataclass
class Trial:
    """One validated candidate of a search."""

    choices: list[Choice]
    params: int  # parameters of the factorizable units after factorization
    error: float
    samples: int  # how many held-out samples it was validated on
    threat: Threat | None = None  # top1 / accuracy: the margin analysis (generalization.py)

    lost: tuple[int, int] | None = None  # top1 / accuracy: decisions lost, of decisions made
    bound: float | None = None  # the upper confidence bound for new inputs (--accept bound)

    @property
    def value(self) -> float:
        """What the search compares with the tolerance (Judged.value)."""
        return Judged(self.error, self.threat, self.lost).value
