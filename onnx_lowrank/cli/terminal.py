"""Terminal tables: the before/after summary and per-layer tables of `compress` and `inspect`.

Everything is laid out for the console's width (80 columns and up read well). Numbers are never cut. A
node name too long for its column is shortened from the middle, keeping the path segments that tell it
apart from every other name printed (`…/layer.0/…/query/MatMul`); when even that does not fit, each
node gets a line of its own above its values. Nothing here relies on colour.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

from ..check.metrics import DISCRETE
from ..report import Latency, LayerReport, Quantization, Report, Validation
from ..run.inspection import LayerInfo

_GAP = " │ "  # between two columns
_INDENT = "  "  # of a node's values under its own line
_ELLIPSIS = "…"
_MIN_NAME = 24  # narrower than this, shortened names stop reading well: each node gets its own line


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------- numbers


def _ratio(after: float, before: float) -> str:
    return f"{after / before:.1%}" if before else "-"


def _g(value: float) -> str:
    """Two significant digits: enough to compare layers (the JSON report has every digit)."""
    return f"{value:.2g}"


def _percent(fraction: float) -> str:
    value = 100 * fraction
    if value == 0:
        return "0%"
    return f"{value:.0f}%" if abs(value) >= 10 else f"{value:.2g}%"


def _upper(value: float, percent: bool = False) -> str:
    """An upper bound in two significant digits, rounded up: never shown below what it bounds."""
    scaled = 100 * value if percent else value
    if scaled > 0:
        step = 10 ** (math.floor(math.log10(scaled)) - 1)
        scaled = math.ceil(scaled / step * (1 - 1e-12)) * step
    text = f"{scaled:.2g}" if scaled < 10 or not percent else f"{scaled:.0f}"
    return text + ("%" if percent else "")


def _against(value: float, tolerance: float | None, percent: bool = False) -> str:
    """The value with as few digits as show on which side of the tolerance it is."""
    show = _percent if percent else _g
    if tolerance is None:
        return show(value)
    for digits in range(2, 8):
        text = f"{100 * value:.{digits}g}%" if percent else f"{value:.{digits}g}"
        shown = float(text.rstrip("%")) / (100 if percent else 1)
        if (shown > tolerance) == (value > tolerance) and (value == tolerance or shown != tolerance):
            return text if digits > 2 else show(value)
    return text


# ------------------------------------------------------------------------------------------ node names


def _segments(name: str) -> tuple[str, list[str]] | None:
    separator = "/" if "/" in name else "." if "." in name else None
    return None if separator is None else (separator, name.split(separator))


def _join(separator: str, parts: Sequence[str], kept: set[int], gap: str) -> str:
    pieces: list[str] = []
    for index, part in enumerate(parts):
        if index in kept:
            pieces.append(part)
        elif index - 1 in kept or index == 0:  # one gap for a run of dropped parts
            pieces.append(gap)
    return separator.join(pieces)


def shorten_name(name: str, width: int, others: Sequence[str]) -> str | None:
    """`name` in at most `width` cells, dropping path segments from the middle but keeping the ones that
    tell it apart from each of `others` (no other name fits the shortened form's pattern, so two
    shortened names never read alike); None when no such form fits. A name without separators is cut by
    characters instead: a head, "…", and a tail long enough to tell it apart."""
    if cell_len(name) <= width:
        return name
    rivals = [other for other in others if other != name]

    def unique(pattern: str) -> bool:
        compiled = re.compile(pattern, re.DOTALL)
        return not any(compiled.fullmatch(other) for other in rivals)

    split = _segments(name)
    if split is not None:
        separator, parts = split
        last = len(parts) - 1

        def shown(kept: set[int]) -> str:
            return _join(separator, parts, kept, _ELLIPSIS)

        def distinct(kept: set[int]) -> bool:
            escaped = [re.escape(part) for part in parts]
            return unique(_join(re.escape(separator), escaped, kept, ".*"))

        kept = {last}
        for index in range(last - 1, -1, -1):  # the distinguishing tail
            if distinct(kept):
                break
            kept.add(index)
        if distinct(kept):
            while cell_len(shown(kept)) > width:  # drop the longest middle segments that are not needed
                middle = sorted(kept - {last, min(kept)}, key=lambda index: -len(parts[index]))
                drop = next((index for index in middle if distinct(kept - {index})), None)
                if drop is None:
                    break
                kept.discard(drop)
            if cell_len(shown(kept)) <= width:
                for index in range(last - 1, -1, -1):  # spend the room left on context, nearest first
                    if index not in kept and parts[index] and cell_len(shown(kept | {index})) <= width:
                        kept.add(index)
                return shown(kept)
        return None  # a path cut inside its segments reads badly: the caller gives the name a line
    for tail in range(1, len(name)):  # by characters: the distinguishing tail (at least half), then a head
        if tail + 1 > width:
            return None
        if unique(".*" + re.escape(name[-tail:])):
            tail = max(tail, (width - 1) // 2)
            head = width - 1 - tail
            while cell_len(name[:head]) > head:
                head -= 1
            return name[:head] + _ELLIPSIS + name[-tail:]
    return None


def _wrap_name(text: str, width: int) -> list[str]:
    """A name too long for a line, broken before its separators (or anywhere in a segment longer than
    the line): wrapped, never cut."""
    pieces = re.split(r"(?=[/.])", text)
    lines = [""]
    for piece in pieces:
        while cell_len(piece) > width:
            room = width - cell_len(lines[-1])
            if room <= 0:
                lines.append("")
                continue
            lines[-1] += piece[:room]
            piece = piece[room:]
            lines.append("")
        if cell_len(lines[-1]) + cell_len(piece) > width and lines[-1]:
            lines.append("")
        lines[-1] += piece
    return [line for line in lines if line]


# -------------------------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class _Column:
    header: str
    narrow: str | None = None  # the header in lines ("\n"), for when the wide one leaves too little room
    right: bool = False  # numbers are right-aligned


@dataclass
class _Row:
    name: str  # the row's label: a node name, or a line of the model table
    cells: list[str]
    op: str = ""
    suffix: str = ""  # after the name, never shortened: " (+2 sharing)"


@dataclass
class _Table:
    title: str
    columns: list[_Column]
    rows: list[_Row]
    label: str = "node"  # the first column's header
    ops: bool = True  # an op column after the names
    shorten_names: bool = True
    universe: list[str] = field(default_factory=list)  # every node name printed: what shortening keeps apart


def _op_in_name(row: _Row) -> bool:
    last = re.split(r"[/.]", row.name)[-1]
    return not row.op or last.startswith(row.op)


def _widths(headers: Sequence[str], columns: Sequence[Sequence[str]]) -> list[int]:
    return [
        max([cell_len(line) for line in header.split("\n")] + [cell_len(cell) for cell in cells])
        for header, cells in zip(headers, columns)
    ]


def _cells_line(cells: Sequence[str], widths: Sequence[int], right: Sequence[bool]) -> str:
    padded = []
    for cell, width, to_right in zip(cells, widths, right):
        space = " " * (width - cell_len(cell))
        padded.append(space + cell if to_right else cell + space)
    return _GAP.join(padded).rstrip()


def _header_lines(headers: Sequence[str], widths: Sequence[int], right: Sequence[bool]) -> list[str]:
    split = [header.split("\n") for header in headers]
    height = max(len(lines) for lines in split)
    split = [[""] * (height - len(lines)) + lines for lines in split]  # bottom-aligned
    return [_cells_line([lines[level] for lines in split], widths, right) for level in range(height)]


def _rule(widths: Sequence[int]) -> str:
    return "─┼─".join("─" * width for width in widths)


def _print_lines(console: Console, lines: Sequence[str], style: str = "") -> None:
    for line in lines:
        console.print(Text(line, style=style), soft_wrap=True)


def _print_table(console: Console, table: _Table) -> None:
    """Inline (one line per row, names shortened where needed) when the console is wide enough for
    readable names, otherwise each row's name on its own line above its values."""
    width = console.width
    names = [row.name for row in table.rows]
    universe = table.universe or names
    ops = table.ops and not all(_op_in_name(row) for row in table.rows)  # "…/MatMul" says it already
    columns = ([_Column("op")] if ops else []) + table.columns
    cells = [([row.op] if ops else []) + row.cells for row in table.rows]
    by_column = [list(column) for column in zip(*cells)] if cells else [[] for _ in columns]
    for narrow in (False, True):
        headers = [(column.narrow if narrow and column.narrow else column.header) for column in columns]
        widths = _widths(headers, by_column)
        room = width - sum(widths) - len(_GAP) * len(widths)
        if all(cell_len(row.name + row.suffix) <= room for row in table.rows):
            shown = [row.name + row.suffix for row in table.rows]
            break
    else:
        shown = None
        if table.shorten_names:
            shortened = [shorten_name(row.name, room - cell_len(row.suffix), universe) for row in table.rows]
            fitting = [name for name in shortened if name is not None]
            if len(fitting) == len(shortened) and min(
                    (room - cell_len(row.suffix) for row in table.rows), default=room) >= _MIN_NAME:
                shown = [name + row.suffix for name, row in zip(fitting, table.rows)]
    _title(console, table.title)
    right = [column.right for column in columns]
    if shown is not None:  # inline
        name_width = max([cell_len(table.label)] + [cell_len(name) for name in shown])
        all_widths, all_right = [name_width, *widths], [False, *right]
        _print_lines(console, _header_lines([table.label, *headers], all_widths, all_right), "bold")
        _print_lines(console, [_rule(all_widths)], "dim")
        for name, row_cells in zip(shown, cells):
            console.print(Text(_cells_line([name, *row_cells], all_widths, all_right)), soft_wrap=True)
        return
    # stacked: the values without the op column, the op after the name where the name does not end in it
    if ops:
        widths, right, headers = widths[1:], right[1:], headers[1:]
        cells = [row_cells[1:] for row_cells in cells]
    _print_lines(console, [_INDENT + line for line in _header_lines(headers, widths, right)], "bold")
    _print_lines(console, [_INDENT + _rule(widths)], "dim")
    for row, row_cells in zip(table.rows, cells):
        label = row.name + row.suffix + ("" if _op_in_name(row) else f" ({row.op})")
        _print_lines(console, _wrap_name(label, width), "bold")
        console.print(Text(_INDENT + _cells_line(row_cells, widths, right)), soft_wrap=True)


def _print_grouped(console: Console, title: str, entries: Sequence[tuple[str, str, str]]) -> None:
    """(node, op, reason) entries under their reason, each name whole (wrapped if longer than a line)."""
    if not entries:
        return
    _title(console, f"{title} ({len(entries)})")
    groups: dict[str, list[tuple[str, str]]] = {}
    for node, op, reason in entries:
        groups.setdefault(reason, []).append((node, op))
    for reason, nodes in groups.items():
        console.print(Text(f"{reason}:"))
        op_width = max(cell_len(op) for _, op in nodes)
        for node, op in nodes:
            lead = _INDENT + op + " " * (op_width - cell_len(op) + 2)
            lines = _wrap_name(node, max(console.width - cell_len(lead), 20))
            _print_lines(console, [lead + lines[0]] + [" " * cell_len(lead) + line for line in lines[1:]])


def _title(console: Console, title: str) -> None:
    console.print()
    console.print(Text(title, style="bold"))


def _legend(console: Console, parts: Sequence[str]) -> None:
    if parts:
        console.print(Text("; ".join(parts) + ".", style="dim"))


# ------------------------------------------------------------------------------------------- compress


def _params(layers: Sequence[LayerReport]) -> list[str]:
    before = max(len(f"{layer.params_before:,}") for layer in layers)
    after = max(len(f"{layer.params_after:,}") for layer in layers)
    return [f"{layer.params_before:>{before},} → {layer.params_after:>{after},}" for layer in layers]


def _layers_table(report: Report) -> tuple[_Table, list[str]]:
    layers = report.layers
    sensitive = any(layer.sensitivity is not None for layer in layers)
    timed = any(layer.latency for layer in layers)
    columns = [_Column("weight shape", "weight\nshape"), _Column("method"), _Column("rank", right=True),
               _Column("params", right=True), _Column("predicted error", "pred.\nerror", right=True)]
    aware = {layer.method.endswith("-data") for layer in layers}
    of = {frozenset({False}): "of its weight", frozenset({True}): "of its output on the calibration data"}.get(
        frozenset(aware), "of its output on the calibration data for the -data methods, else of its weight")
    legend = [f"predicted error: the share of the layer's energy dropped at its rank ({of})"]
    if sensitive:
        columns.append(_Column("sensitivity", "sensi-\ntivity", right=True))
        legend.append("sensitivity: the output's squared relative error per unit of it")
    if timed:
        columns.append(_Column("speedup", "speed-\nup", right=True))
        legend.append("speedup: the layer alone, dense time / factorized time" + _untimed(layers))
    if any(layer.method == "prune" for layer in layers):
        legend.append("ch: the channels a pruned pair keeps between its layers (no rank: columns and rows are cut)")
    if any(layer.quantization for layer in layers):
        legend.append("int4 / int8-wo bN: 4- / 8-bit blocks of N weights (MatMulNBits, GatherBlockQuantized), its "
                      "rank the low-rank correction's (c8: its factors in 8 bits), its params its bytes in weights; "
                      "int8-dyn: 8-bit blocks with int8 activations (MatMulNBits accuracy_level 4); "
                      "svd-int4 / svd-int8: the SVD at its rank, both factors in 4- / 8-bit blocks")
    rows = []
    for layer, params in zip(layers, _params(layers)):
        rank = str(layer.rank) if isinstance(layer.rank, int) else "x".join(map(str, layer.rank))
        method = _scheme(layer.method, layer.quantization)
        cells = ["x".join(map(str, layer.shape)), method, f"{rank} ch" if layer.method == "prune" else rank,
                 params, _g(layer.predicted_error)]
        if sensitive:
            cells.append("" if layer.sensitivity is None else _g(layer.sensitivity))
        if timed:
            timing = layer.latency
            cells.append(f"{timing['dense_ms'] / timing['factorized_ms']:.2f}x"
                         if timing and timing.get("factorized_ms") else "—")
        shared = f" (+{len(layer.nodes) - 1} sharing)" if len(layer.nodes) > 1 else ""
        rows.append(_Row(layer.node, cells, layer.op, shared))
    return _Table(f"Factorized layers ({len(layers)})", columns, rows), legend


def _untimed(layers: Sequence[LayerReport]) -> str:
    """Why some layers have no speedup (the legend's words for their "—")."""
    untimed = {layer.method for layer in layers if not (layer.latency and layer.latency.get("factorized_ms"))}
    if not untimed:
        return ""
    if untimed <= {"prune", "heads"}:
        return ("; —: not timed: pruned channels and heads run the same ops on smaller matrices, never slower "
                "than dense")
    return "; —: not timed"


def _model_table(report: Report) -> _Table:
    rows = [
        _Row("parameters", [f"{report.params_before:,}", f"{report.params_after:,}",
                            _ratio(report.params_after, report.params_before)]),
        _Row("bytes", [human_bytes(report.bytes_before), human_bytes(report.bytes_after),
                       _ratio(report.bytes_after, report.bytes_before)]),
    ]
    ops = sorted(set(report.ops_before) | set(report.ops_after))
    changed = [op for op in ops if report.ops_before.get(op, 0) != report.ops_after.get(op, 0)]
    for op in changed:
        before, after = report.ops_before.get(op, 0), report.ops_after.get(op, 0)
        rows.append(_Row(f"{op} nodes", [str(before), str(after), f"{after - before:+d}"]))
    rest = [op for op in ops if op not in changed]
    if rest:
        count = sum(report.ops_before.get(op, 0) for op in rest)
        kinds = f"{len(rest)} op type{'s' if len(rest) > 1 else ''}"
        label = f"other nodes ({kinds})" if changed else f"nodes ({kinds})"
        rows.append(_Row(label, [str(count), str(count), ""]))
    rows.append(_Row("time", ["", f"{report.seconds:.2f} s", ""]))
    columns = [_Column("before", right=True), _Column("after", right=True), _Column("ratio", right=True)]
    return _Table("Model", columns, rows, label="", ops=False, shorten_names=False)


def validation_text(check: Validation) -> str:
    """What the held-out check found (what was counted against the tolerance, what was exempt), and what it
    promises for new inputs (as much as is known, and whether that is within the tolerance), a line each."""
    percent = check.metric in DISCRETE
    if check.tolerance is None:
        bound = "no tolerance set"
    else:
        side = "within" if check.value <= check.tolerance else "ABOVE"
        bound = f"{side} the tolerance {_percent(check.tolerance) if percent else _g(check.tolerance)}"
    if percent:
        clauses = _decision_clauses(check, bound)
    else:
        clauses = [(f"{check.metric} {_against(check.value, check.tolerance)} on {check.samples:,} held-out "
                    f"samples ({check.provider}), {bound}")]
        if check.unseen_bound is not None and check.confidence is not None:
            confidence = f"with {100 * check.confidence:.3g}% confidence"
            if check.metric == "max-abs":
                clauses.append(f"{confidence} at most {_upper(check.unseen_bound, True)} of new inputs exceed it")
            else:
                clauses.append(f"{confidence} at most {_upper(check.unseen_bound)} on new inputs"
                               + _promise_against(check))
    return "\n".join(clauses)


def _decision_clauses(check: Validation, bound: str) -> list[str]:
    """validation_text for top1 / accuracy: the decisions changed (lost), which of them were near-ties and
    whether those counted, what was held against the tolerance, the promise, the margins, the near-ties."""
    decisions, lost = check.decisions, check.lost
    if decisions is None and check.metric == "accuracy":  # one decision per sample
        decisions = check.samples
    if lost is None and decisions is not None:
        lost = round(check.value * decisions)
    what = "samples lost" if check.metric == "accuracy" else "decisions changed"
    unit = "samples" if check.metric == "accuracy" else "decisions"
    exempt = check.ties_exempt is not False  # reports from before --ties: near-ties were exempt
    clauses = []
    if decisions is not None and lost is not None:
        share = f" ({_against(lost / decisions, check.tolerance, True)})" if lost and decisions else ""
        counted = lost - (check.ties_lost or 0 if exempt else 0)
        line = f"{what}: {lost:,}{share} of {decisions:,} held-out ({check.provider})"
        if check.ties_lost:
            noun = "a near-tie" if check.ties_lost == 1 else "near-ties"
            line += (f", {check.ties_lost:,} of them {noun} (exempt): {counted:,} counted" if exempt
                     else f", {check.ties_lost:,} of them {noun} (counted)")
        if check.value <= counted / decisions * (1 + 1e-9):
            clauses.append(f"{line}, {bound}")
        else:  # the margins' prediction is larger than the count, and is what was held
            held = _against(check.value, check.tolerance, True)
            clauses += [line, (f"held against the tolerance: {held} of calibration {unit} predicted to change "
                               f"(margins threatened, below), {bound}")]
    else:
        clauses.append(f"{what}: {_against(check.value, check.tolerance, True)} on {check.samples:,} "
                       f"held-out samples ({check.provider}), {bound}")
    if check.unseen_bound is not None and check.confidence is not None:
        verb = "of new inputs lose their decision" if check.metric == "accuracy" else "of new decisions change"
        clauses.append(f"with {100 * check.confidence:.3g}% confidence at most {_upper(check.unseen_bound, True)} "
                       f"{verb}" + _promise_against(check))
    if check.threatened is not None:
        total = check.calibration_decisions
        if total is None and check.threatened and check.predicted_unseen:
            total = round(check.threatened / check.predicted_unseen)
        of = f" of {total:,}" if total is not None else ""
        clauses.append(f"margins threatened: {check.threatened:,}{of} calibration {unit}")
    if check.ties:
        noun = unit[:-1] if check.ties == 1 else unit
        ties_lost = f", {check.ties_lost:,} of them lost" if check.ties_lost else ""
        held = "not held against the tolerance" if exempt else "counted against the tolerance"
        clauses.append(f"near-ties: {check.ties:,} calibration {noun} (may flip either way; {held}{ties_lost})")
    return clauses


def _promise_against(check: Validation) -> str:
    """Where the promise for new inputs is above a positive tolerance the held-out value is within, a plain
    statement of it (at tolerance 0, lossless, no finite number of samples could promise 0)."""
    if not check.tolerance or check.unseen_bound is None or check.unseen_bound <= check.tolerance \
            or check.value > check.tolerance:  # above the tolerance already: the promise is no news
        return ""
    tolerance = _percent(check.tolerance) if check.metric in ("accuracy", "top1") else _g(check.tolerance)
    if check.accept == "bound":
        return f": ABOVE the tolerance {tolerance}, which --accept bound requires of it"
    return (f": ABOVE the tolerance {tolerance}, which only the held-out samples are within (--accept bound "
            f"accepts only a promise within it)")


def not_validated_text(report: Report) -> str:
    """Why a run without calibration data is not to be trusted yet, what it predicts, how to check: one
    line each."""
    lines = ["NOT VALIDATED: without calibration data, the outputs were not checked."]
    if report.layers:
        worst = max(report.layers, key=lambda layer: layer.predicted_error)
        weight = sum(layer.params_before for layer in report.layers)
        mean = sum(layer.predicted_error * layer.params_before for layer in report.layers) / max(weight, 1)
        lines.append(f"Predicted error (the share of a weight's energy dropped): largest "
                     f"{_g(worst.predicted_error)} at {worst.node}; parameter-weighted mean {_g(mean)}.")
    if report.quantization is not None:
        lines.append("The int8 quantization's error was not measured either.")
    lines.append("Validate with --calib FILE.npz (it also makes the factorization data-aware).")
    return "\n".join(lines)


def _quantization_lines(q: Quantization, report: Report) -> list[str]:
    label = "int8"
    if q.range:
        label += f" ({q.range} range: {q.range_reason})" if q.range_reason else f" ({q.range} range)"
    lines = [f"{label}: {human_bytes(q.bytes_factorized)} factorized → {human_bytes(q.bytes_quantized)} "
             f"with int8"]
    if q.error_quantized is not None and q.error_factorized is not None:
        metric = report.validation.metric if report.validation else "error"
        lines[0] += f"; {metric} {_g(q.error_factorized)} factorized → {_g(q.error_quantized)} with int8"
    taken = q.fallback_nodes or []
    if taken:
        names = ", ".join(f"{node.node} ({node.scheme})" for node in taken)
        lines.append(f"int8: taken out of dynamic quantization (they cost the most error): {names}")
    return lines


def _latency_line(timing: Latency, what: str = "latency") -> str:
    """End to end, the original against the compressed model; or why onnxruntime could not time them."""
    setup = f"{timing.provider}, batch {timing.batch}"
    original, compressed, speedup = timing.original, timing.compressed, timing.speedup
    if original is None or compressed is None or speedup is None:  # the timing failed: only `error`
        return f"{what} ({setup}): {timing.error or 'not measured'}"
    return (f"{what} ({setup}, median of {timing.runs} runs): "
            f"{original.median_ms:.3g} ms → {compressed.median_ms:.3g} ms ({speedup:.2f}x)")


def print_compress(report: Report, console: Console, written: bool, output=None) -> None:
    """Per-layer table, the layers left as they were, the before/after summary (parameters, bytes, the
    node counts that changed), the validation result and what it promises, where the model went
    (`output`); a run nothing validated ends with a NOT VALIDATED line."""
    names = [node for layer in report.layers for node in layer.nodes] + [entry.node for entry in report.skipped]
    if report.layers:
        table, legend = _layers_table(report)
        table.universe = names
        _print_table(console, table)
        _legend(console, legend)
    _print_grouped(console, "Left as they were", [(entry.node, entry.op, entry.reason) for entry in report.skipped])
    _print_table(console, _model_table(report))
    if report.validation is not None:
        _title(console, "Validation")
        console.print(Text(validation_text(report.validation)))
    if report.refit == "sequential":
        console.print(Text(f"refit: {report.refit_layers} layers solved again for their inputs in the compressed model"))
    if report.quantization is not None:
        for line in _quantization_lines(report.quantization, report):
            console.print(Text(line))
    if report.latency is not None:
        console.print(Text(_latency_line(report.latency, "prompt latency" if report.decode_latency else "latency")))
    if report.decode_latency is not None:
        console.print(Text(_latency_line(report.decode_latency, "one-token decode latency")))
    if report.fusions is not None and report.fusions.unfactorized_match is False:
        # a completed fusion check (unfactorized_match set) lists its changes
        lost = ", ".join(entry.kind for entry in report.fusions.lost or [] if entry.layer is None)
        console.print(Text(f"warning: ONNX Runtime fuses fewer nodes outside the factorized layers: {lost}"))
    for note in report.notes:
        console.print(Text(f"note: {note}"))
    if not report.layers and written:
        console.print(Text("Nothing was factorized; the model is written unchanged." if report.quantization is None
                           else "Nothing was factorized; only the int8 quantization changed the model."))
    if output is not None:
        console.print(Text(f"wrote {output}"))
    if written and report.validation is None and (report.layers or report.quantization is not None):
        console.print()
        text = Text(not_validated_text(report))
        text.stylize("bold yellow", 0, len("NOT VALIDATED:"))
        console.print(text)


# -------------------------------------------------------------------------------------------- inspect


def print_inspect(rows: Sequence[LayerInfo], console: Console, data: bool = False) -> None:
    """The per-layer table, then the layers that cannot be factorized under their reason; energies are
    of the weight's singular values, or of the outputs on data."""
    source = "output energy on the calibration data" if data else "singular-value energy of the weights"
    factorizable = [row for row in rows if row.reason is None]
    grouped = any(row.groups is not None and row.groups > 1 for row in factorizable)
    columns = [_Column("weight shape", "weight\nshape")]
    if grouped:
        columns.append(_Column("groups", right=True))
    columns += [
        _Column("params", right=True),
        _Column("break-even", "break-\neven", right=True),
        _Column("eff. rank", "eff.\nrank", right=True),
        _Column("r90 / r99", "r90/r99", right=True),
        _Column("energy kept", "energy\nkept", right=True),
        _Column("best at half size", "best at\nhalf size"),
    ]
    table_rows = []
    for row in factorizable:
        best = next(iter(row.at_half.items()), None)
        assert row.shape is not None, "inspect gives every factorizable layer its shape"
        cells = ["x".join(map(str, row.shape))] + ([str(row.groups)] if grouped else []) + [
            f"{row.params:,}",
            str(row.break_even),
            f"{row.effective_rank:.1f}",
            f"{row.rank_90}/{row.rank_99}",
            "—" if row.energy_at_break_even is None else f"{row.energy_at_break_even:.1%}",
            "none" if best is None else f"{best[0]} {_g(best[1])}",
        ]
        shared = f" (+{len(row.shared_by)} sharing)" if row.shared_by else ""
        table_rows.append(_Row(row.node, cells, row.op, shared))
    universe = [row.node for row in rows] + [node for row in rows for node in row.shared_by]
    if table_rows:
        _print_table(console, _Table(f"Layers ({source})", columns, table_rows, universe=universe))
        _legend(console, [
            "break-even: the largest rank that still saves parameters",
            "r90 / r99: the smallest ranks keeping 90% / 99% of the energy",
            "energy kept: at the break-even rank" + (
                " (—: no SVD rank saves parameters, as in a depthwise convolution, whose groups are single rows; "
                "another method may)" if any(row.energy_at_break_even is None for row in factorizable) else ""),
            "best at half size: the least predicted error at half the parameters, and its method",
        ] + (["groups: matrices factorized at one rank (conv groups, MatMul batch)"] if grouped else []))
    _print_grouped(console, "Not factorizable", [(row.node, row.op, row.reason) for row in rows if row.reason])
    console.print()
    console.print(Text(
        f"{len(factorizable)} factorizable layers ({sum(r.params or 0 for r in factorizable):,} parameters), "
        f"{len(rows) - len(factorizable)} skipped."
    ))


def _scheme(method: str, quantization: dict[str, int] | None) -> str:
    """A layer's method, with its blocks' size and (c8) a correction stored in 8 bits."""
    if not quantization:
        return method
    eight = " c8" if quantization.get("correction_bits") == 8 else ""
    return f"{method} b{quantization['block']}{eight}"
