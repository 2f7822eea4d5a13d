"""Terminal tables: the before/after summary and per-layer tables of `compress` and `inspect`."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from .inspection import LayerInfo
from .report import Report


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _ratio(after: float, before: float) -> str:
    return f"{after / before:.1%}" if before else "-"


def _layer_ms(latency: dict | None) -> str:
    return "" if not latency else f"{latency['dense_ms']:.3g} -> {latency['factorized_ms']:.3g}"


def print_compress(report: Report, console: Console, written: bool) -> None:
    """Per-layer table, skipped layers, the before/after summary (parameters, bytes, nodes by op) and
    the validation result."""
    if report.layers:
        layers = Table(title="Factorized layers", title_justify="left")
        timed = any(layer.latency for layer in report.layers)
        numeric = ("rank", "params", "predicted error", "sensitivity") + (("ms dense -> factorized",) if timed else ())
        for column in ("node", "op", "weight shape", "method", *numeric):
            layers.add_column(column, justify="right" if column in numeric else "left")
        for layer in report.layers:
            shared = f" (+{len(layer.nodes) - 1} sharing)" if len(layer.nodes) > 1 else ""
            layers.add_row(
                layer.node + shared,
                layer.op,
                "x".join(map(str, layer.shape)),
                layer.method,
                str(layer.rank) if isinstance(layer.rank, int) else "x".join(map(str, layer.rank)),
                f"{layer.params_before:,} -> {layer.params_after:,}",
                f"{layer.predicted_error:.2e}",
                "" if layer.sensitivity is None else f"{layer.sensitivity:.3g}",
                *((_layer_ms(layer.latency),) if timed else ()),
            )
        console.print(layers)
    if report.skipped:
        skipped = Table(title="Left as they were", title_justify="left")
        for column in ("node", "op", "reason"):
            skipped.add_column(column)
        for entry in report.skipped:
            skipped.add_row(entry.node, entry.op, entry.reason)
        console.print(skipped)
    summary = Table(title="Model", title_justify="left")
    for column, justify in (("", "left"), ("before", "right"), ("after", "right"), ("ratio", "right")):
        summary.add_column(column, justify=justify)
    summary.add_row("parameters", f"{report.params_before:,}", f"{report.params_after:,}",
                    _ratio(report.params_after, report.params_before))
    summary.add_row("bytes", human_bytes(report.bytes_before), human_bytes(report.bytes_after),
                    _ratio(report.bytes_after, report.bytes_before))
    for op in sorted(set(report.ops_before) | set(report.ops_after)):
        before, after = report.ops_before.get(op, 0), report.ops_after.get(op, 0)
        summary.add_row(f"{op} nodes", str(before), str(after), "" if before == after else f"{after - before:+d}")
    summary.add_row("time", "", f"{report.seconds:.2f} s", "")
    console.print(summary)
    check = report.validation
    if check is not None:
        bound = "no bound asked" if check.tolerance is None else (
            f"{'within' if check.passed else 'ABOVE'} the tolerance {check.tolerance:g}")
        console.print(f"validated on {check.samples} held-out samples ({check.provider}): "
                      f"{check.metric} = {check.value:.4g}, {bound}")
    if report.quantization is not None:
        q = report.quantization
        errors = "" if q["error_quantized"] is None else (
            f"; {report.validation.metric if report.validation else 'error'} {q['error_factorized']:.4g} "
            f"factorized -> {q['error_quantized']:.4g} with int8")
        console.print(f"int8: {human_bytes(q['bytes_factorized'])} factorized -> {human_bytes(q['bytes_quantized'])}"
                      f"{errors}")
        taken = q.get("fallback_nodes") or []
        if taken:
            names = ", ".join(f"{node['node']} ({node['scheme']})" for node in taken)
            console.print(f"int8: taken out of dynamic quantization (they cost the most error): {names}", markup=False)
    if report.latency is not None:
        timing = report.latency
        console.print(f"latency ({timing['provider']}, batch {timing['batch']}, median of {timing['runs']} runs "
                      f"side by side): {timing['original']['median_ms']:.3g} ms -> "
                      f"{timing['compressed']['median_ms']:.3g} ms ({timing['speedup']:.2f}x)")
    if report.fusions is not None and not report.fusions.get("unfactorized_match", True):
        lost = ", ".join(entry["kind"] for entry in report.fusions["lost"] if entry["layer"] is None)
        console.print(f"warning: ONNX Runtime fuses fewer nodes outside the factorized layers: {lost}")
    for note in report.notes:
        console.print(f"note: {note}")
    if not report.layers and written:
        console.print("Nothing was factorized; the model is written unchanged.")


def print_inspect(rows: Sequence[LayerInfo], console: Console, data: bool = False) -> None:
    """The per-layer table; energies are of the weight's singular values, or of the outputs on data."""
    source = "output energy on the calibration data" if data else "singular-value energy of the weights"
    table = Table(title=f"Layers ({source})", title_justify="left")
    columns = ("node", "op", "weight shape", "groups x matrix", "params", "break-even", "eff. rank",
               "r90 / r99", "energy at break-even", "best at half the params", "reason skipped")
    for column in columns:
        table.add_column(column, justify="right" if column in ("params", "break-even", "eff. rank") else "left")
    for row in rows:
        if row.reason is not None:
            table.add_row(row.node, row.op, *[""] * 8, row.reason)
            continue
        shared = f" (+{len(row.shared_by)} sharing)" if row.shared_by else ""
        table.add_row(
            row.node + shared,
            row.op,
            "x".join(map(str, row.shape)),
            f"{row.groups} x {row.matrix[0]}x{row.matrix[1]}",
            f"{row.params:,}",
            str(row.break_even),
            f"{row.effective_rank:.1f}",
            f"{row.rank_90} / {row.rank_99}",
            f"{row.energy_at_break_even:.1%}",
            ", ".join(f"{method} {error:.2g}" for method, error in list(row.at_half.items())[:2]),
            "",
        )
    console.print(table)
    factorizable = [row for row in rows if row.reason is None]
    console.print(
        f"{len(factorizable)} factorizable layers ({sum(r.params for r in factorizable):,} parameters), "
        f"{len(rows) - len(factorizable)} skipped."
    )
