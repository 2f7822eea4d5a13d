"""The terminal summary at 80 columns: nothing wider, numbers whole, node names told apart, the wording of
the validation (or of its absence). Three real runs, shared; the edge cases on reports built here."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

import pytest
from conftest import inspected, shared_run
from rich.console import Console

import onnx_lowrank
from onnx_lowrank.cli.terminal import not_validated_text, print_compress, print_inspect, shorten_name, validation_text
from onnx_lowrank.report import Latency, LayerReport, Quantization, Report, SkippedLayer, Timing, Validation

MODELS = Path(__file__).resolve().parents[1] / "models"
MINILM, DIGITS = MODELS / "minilm_l2.onnx", MODELS / "digits_cnn.onnx"
WIDTH = 80


# ---------------------------------------------------------------------------------------------- helpers


def render(printer, *arguments, width: int = WIDTH, **keywords) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    printer(*arguments, console, **keywords)
    text = console.export_text()
    too_wide = [line for line in text.splitlines() if len(line) > width]
    assert not too_wide, "\n".join(too_wide)
    return text


def table(text: str, title: str, count: int) -> list[tuple[str, list[str]]]:
    """The (name as shown, value cells) of the `count` rows of the table titled `title`, in either
    layout: one line per row (name in the first cell) or the name on its own line(s) above the values."""
    lines = text.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(title))
    rule = next(index for index in range(start, len(lines)) if "─┼─" in lines[index])
    rows, name, index = [], "", rule + 1
    while len(rows) < count:
        line = lines[index]
        index += 1
        if " │ " not in line:  # a name line of the stacked layout (a long name may take several)
            name += line
        elif line.startswith("  ") and name:
            rows.append((name, [cell.strip() for cell in line.split("│")]))
            name = ""
        else:
            first, *cells = line.split("│")
            rows.append((first.strip(), [cell.strip() for cell in cells]))
    return rows


def resolve(shown: str, universe: list[str]) -> list[str]:
    """Every name the shown (possibly shortened) one can stand for."""
    shown = re.sub(r" \((\+\d+ sharing|[A-Za-z]+)\)$", "", shown)
    pattern = re.compile(".*".join(re.escape(piece) for piece in shown.split("…")), re.DOTALL)
    return [name for name in universe if pattern.fullmatch(name)]


def paragraph(text: str, start: str) -> str:
    """The lines from the one starting with `start` to the next blank line, joined by spaces."""
    lines = text.splitlines()
    first = next(index for index, line in enumerate(lines) if line.startswith(start))
    block = []
    for line in lines[first:]:
        if not line.strip():
            break
        block.append(line.strip())
    return " ".join(block)


def layer(node: str, params_before: int = 147_456, params_after: int = 73_728, rank: int | list[int] = 96,
          error: float = 0.05, **keywords) -> LayerReport:
    return LayerReport(node=node, op=keywords.pop("op", "MatMul"), weight=node + ".weight",
                       shape=keywords.pop("shape", [384, 384]), method=keywords.pop("method", "svd"), rank=rank,
                       params_before=params_before, params_after=params_after, predicted_error=error,
                       nodes=keywords.pop("nodes", [node]), **keywords)


def report(layers=(), skipped=(), validation=None, **keywords) -> Report:
    values = dict(params_before=1_234_567, params_after=556_789, bytes_before=4_938_268, bytes_after=2_227_156,
                  seconds=1.5, ops_before={"MatMul": 4, "Add": 3}, ops_after={"MatMul": 8, "Add": 3})
    values.update(keywords)
    return Report(layers=list(layers), skipped=list(skipped), validation=validation, **values)


# ------------------------------------------------------------------------------------------ real runs


@pytest.fixture(scope="module")
def minilm_rows():
    return list(inspected(MINILM))  # shared with the other modules that inspect MiniLM


@pytest.fixture(scope="module")
def minilm_report():
    return shared_run("minilm target 0.7").report  # target_params 0.7, no data: not validated (test_real_models')


@pytest.fixture(scope="module")
def digits_report():
    return onnx_lowrank.compress(DIGITS, calibration=MODELS / "digits_calib.npz",
                                 labels=MODELS / "digits_calib_labels.npy", metric="accuracy", tolerance=0.02,
                                 method="svd", objective="size", jobs=1)[1]


def test_inspect_minilm_at_80_columns(minilm_rows):
    text = render(print_inspect, minilm_rows)
    factorizable = [row for row in minilm_rows if row.reason is None]
    skipped = [row for row in minilm_rows if row.reason is not None]
    universe = [row.node for row in minilm_rows]
    shown = table(text, "Layers (singular-value energy of the weights)", len(factorizable))
    assert len({name for name, _ in shown}) == len(shown)
    for row, (name, cells) in zip(factorizable, shown):
        assert resolve(name, universe) == [row.node], name
        for number in (f"{row.params:,}", str(row.break_even), f"{row.effective_rank:.1f}",
                       f"{row.rank_90}/{row.rank_99}", f"{row.energy_at_break_even:.1%}", "x".join(map(str, row.shape))):
            assert number in cells, (number, cells)
    assert f"Not factorizable ({len(skipped)})" in text
    for row in skipped:  # whole, with the op, under its reason
        assert any(row.node in line and row.op in line for line in text.splitlines()), row.node
        assert f"{row.reason}:" in text.replace("\n", " ")
    assert f"{len(factorizable)} factorizable layers ({sum(r.params for r in factorizable):,} parameters)" in text


def test_compress_without_data_at_80_columns_ends_not_validated(minilm_report):
    rep = minilm_report
    text = render(print_compress, rep, written=True)
    universe = [node for lr in rep.layers for node in lr.nodes] + [entry.node for entry in rep.skipped]
    shown = table(text, "Factorized layers", len(rep.layers))
    assert len({name for name, _ in shown}) == len(shown)
    for lr, (name, cells) in zip(rep.layers, shown):
        assert resolve(name, universe) == [lr.node], name
        assert str(lr.rank) in cells and lr.method in cells
        params = next(cell for cell in cells if "→" in cell)
        assert [part.strip() for part in params.split("→")] == [f"{lr.params_before:,}", f"{lr.params_after:,}"]
    for entry in rep.skipped:
        assert any(entry.node in line for line in text.splitlines()), entry.node
    model = dict(table(text, "Model", 3 + 1 + 1))  # parameters, bytes, MatMul nodes, the rest, time
    assert model["parameters"] == [f"{rep.params_before:,}", f"{rep.params_after:,}",
                                   f"{rep.params_after / rep.params_before:.1%}"]
    changed = sorted(op for op in rep.ops_before if rep.ops_before[op] != rep.ops_after.get(op, 0))
    assert changed == ["MatMul"]
    assert model["MatMul nodes"] == [str(rep.ops_before["MatMul"]), str(rep.ops_after["MatMul"]),
                                     f"{rep.ops_after['MatMul'] - rep.ops_before['MatMul']:+d}"]
    rest = sum(count for op, count in rep.ops_before.items() if op != "MatMul")
    assert model[f"other nodes ({len(rep.ops_before) - 1} op types)"] == [str(rest), str(rest), ""]
    assert "Unsqueeze nodes" not in text  # unchanged op types are summed up, not listed
    # the last thing printed: not validated, the predicted error, how to validate
    last = text.strip().split("\n\n")[-1]
    assert last.startswith("NOT VALIDATED:")
    worst = max(rep.layers, key=lambda lr: lr.predicted_error)
    mean = sum(lr.predicted_error * lr.params_before for lr in rep.layers) / sum(lr.params_before for lr in rep.layers)
    flat = " ".join(last.split())
    assert f"largest {worst.predicted_error:.2g} at {worst.node}; parameter-weighted mean {mean:.2g}" in flat
    assert "--calib FILE.npz" in flat


def test_not_validated_stands_out_in_colour(minilm_report):
    console = Console(width=WIDTH, record=True, file=io.StringIO(), force_terminal=True, color_system="standard")
    print_compress(minilm_report, console, written=True)
    assert "\x1b[1;33mNOT VALIDATED:\x1b[0m" in console.export_text(styles=True)


def test_compress_with_accuracy_data_at_80_columns(digits_report):
    rep, check = digits_report, digits_report.validation
    text = render(print_compress, rep, written=True)
    assert "NOT VALIDATED" not in text
    shown = table(text, "Factorized layers", len(rep.layers))
    for lr, (name, cells) in zip(rep.layers, shown):
        assert name == lr.node and str(lr.rank) in cells
    lines = paragraph(text, "Validation")
    side = "within" if check.passed else "ABOVE"
    assert f"samples lost: {check.lost:,}" in lines and f"of {check.samples} held-out (cpu)" in lines
    assert f"{side} the tolerance 2%" in lines
    if check.unseen_bound is not None:  # rounded up: never shown below what it bounds
        shown = re.search(r"with 95% confidence at most ([\d.]+)% of new inputs lose their decision", lines)
        assert 100 * check.unseen_bound <= float(shown[1]) <= 110 * check.unseen_bound, lines
    if check.threatened is not None:
        total = check.calibration_decisions
        assert f"margins threatened: {check.threatened} of {total:,} calibration samples" in lines


# ------------------------------------------------------------------------------------------ node names


LONG = [  # differ only in the middle, or only at the end
    "/model/encoder/layers.0/block/attention/projection/MatMul",
    "/model/encoder/layers.1/block/attention/projection/MatMul",
    "/model/encoder/layers.1/block/attention/projection/MatMul_1",
    "a_node_name_without_any_path_segments_that_is_long_enough_to_need_shortening_a",
    "a_node_name_without_any_path_segments_that_is_long_enough_to_need_shortening_b",
]


@pytest.mark.parametrize("width", [80, 100, 140, 200])
@pytest.mark.parametrize("data", [False, True], ids=["weights", "data"])
def test_long_names_that_differ_in_the_middle_or_at_the_end_stay_apart(width, data):
    extra = dict(sensitivity=0.25, latency={"dense_ms": 0.5, "factorized_ms": 0.25}) if data else {}
    layers = [layer(name, params_before=1_234_567 + i, params_after=45_678 + i, rank=100 + i, **extra)
              for i, name in enumerate(LONG)]
    layers[0].nodes = [LONG[0], "/model/encoder/layers.0/block/attention/projection/MatMul_tied"]
    text = render(print_compress, report(layers), written=True, width=width)
    universe = LONG + layers[0].nodes[1:]
    shown = table(text, "Factorized layers", len(layers))
    assert len({name for name, _ in shown}) == len(LONG)
    for lr, (name, cells) in zip(layers, shown):
        assert resolve(name, universe) == [lr.node], (name, text)
        assert str(lr.rank) in cells
        assert any(cell.replace(" ", "") == f"{lr.params_before:,}→{lr.params_after:,}" for cell in cells)
    assert shown[0][0].endswith(" (+1 sharing)")
    if data:
        assert all("2.00x" in cells and "0.25" in cells for _, cells in shown)


def test_shorten_keeps_what_tells_names_apart():
    assert shorten_name(LONG[0], 80, LONG) == LONG[0]  # fits: whole
    short = shorten_name(LONG[0], 30, LONG)
    assert len(short) <= 30 and "layers.0" in short and short.endswith("/MatMul")
    assert resolve(short, LONG) == [LONG[0]]
    ending = shorten_name(LONG[2], 24, LONG)
    assert ending == "…/projection/MatMul_1" and resolve(ending, LONG) == [LONG[2]]  # its end tells it apart
    by_characters = shorten_name(LONG[3], 20, LONG)
    assert len(by_characters) == 20 and by_characters.endswith("_a") and resolve(by_characters, LONG) == [LONG[3]]
    assert shorten_name(LONG[0], 8, LONG) is None  # no form that short tells it apart: the caller wraps
    dotted = ["encoder.layers.10.attention.output.dense", "encoder.layers.11.attention.output.dense"]
    assert resolve(shorten_name(dotted[1], 20, dotted), dotted) == [dotted[1]]


def test_names_are_printed_as_they_are():
    rep = report([layer("/x/[bold]y[/bold]/MatMul")], [SkippedLayer("[red]z", "MatMul", "kept [dense]")])
    text = render(print_compress, rep, written=True)
    assert "/x/[bold]y[/bold]/MatMul" in text and "[red]z" in text and "kept [dense]:" in text


# ---------------------------------------------------------------------------------------------- wording


@pytest.mark.parametrize("check, expected", [
    (Validation("accuracy", 0.0, 0.0, True, "cpu", 192, confidence=0.95, unseen_bound=0.0155, decisions=192,
                lost=0, threatened=0, calibration_decisions=256, predicted_unseen=0.0),
     "samples lost: 0 of 192 held-out (cpu), within the tolerance 0%\n"
     "with 95% confidence at most 1.6% of new inputs lose their decision\n"
     "margins threatened: 0 of 256 calibration samples"),
    (Validation("accuracy", 0.0, 0.0, True, "cpu", 192, confidence=0.95, unseen_bound=0.0155, decisions=192,
                lost=0, threatened=1, predicted_unseen=1 / 256),
     "samples lost: 0 of 192 held-out (cpu), within the tolerance 0%\n"
     "with 95% confidence at most 1.6% of new inputs lose their decision\n"
     "margins threatened: 1 of 256 calibration samples"),
    (Validation("top1", 0.003, 0.01, True, "cuda", 100, confidence=0.99, unseen_bound=0.0088, decisions=1000,
                lost=3, threatened=5, predicted_unseen=5 / 4000),
     "decisions changed: 3 (0.3%) of 1,000 held-out (cuda), within the tolerance 1%\n"
     "with 99% confidence at most 0.88% of new decisions change\n"
     "margins threatened: 5 of 4,000 calibration decisions"),
    (Validation("cosine", 0.0072, 0.01, True, "cpu", 100, confidence=0.95, unseen_bound=0.0085),
     "cosine 0.0072 on 100 held-out samples (cpu), within the tolerance 0.01\n"
     "with 95% confidence at most 0.0085 on new inputs"),
    (Validation("rel-l2", 0.0612, 0.05, False, "cpu", 100, confidence=0.95, unseen_bound=0.07),
     "rel-l2 0.061 on 100 held-out samples (cpu), ABOVE the tolerance 0.05\n"
     "with 95% confidence at most 0.07 on new inputs"),
    (Validation("max-abs", 0.08, 0.1, True, "cpu", 100, confidence=0.95, unseen_bound=0.0291),
     "max-abs 0.08 on 100 held-out samples (cpu), within the tolerance 0.1\n"
     "with 95% confidence at most 3% of new inputs exceed it"),
    # digits enough to show on which side of the tolerance a close value is
    (Validation("cosine", 0.01004, 0.01, False, "cpu", 100),
     "cosine 0.01004 on 100 held-out samples (cpu), ABOVE the tolerance 0.01"),
    (Validation("cosine", 0.0099996, 0.01, True, "cpu", 100),
     "cosine 0.0099996 on 100 held-out samples (cpu), within the tolerance 0.01"),
    # what is not known is not printed
    (Validation("accuracy", 1 / 269, None, None, "cpu", 269),
     "samples lost: 1 (0.37%) of 269 held-out (cpu), no tolerance set"),
    (Validation("top1", 0.003, 0.01, True, "cpu", 100),
     "decisions changed: 0.3% on 100 held-out samples (cpu), within the tolerance 1%"),
    (Validation("accuracy", 0.0, 0.0, True, "cpu", 192, confidence=0.95, decisions=192, lost=0),
     "samples lost: 0 of 192 held-out (cpu), within the tolerance 0%"),
])
def test_validation_wording(check, expected):
    assert validation_text(check) == expected


def test_validation_counts_near_ties():
    check = Validation("accuracy", 1 / 192, 0.0, True, "cpu", 192, decisions=192, lost=1, threatened=0, ties=2,
                       ties_lost=1)
    assert validation_text(check).endswith("near-ties: 2 calibration samples (may flip either way; not held against "
                                           "the tolerance, 1 of them lost)")


def test_bound_not_met_says_above_and_not_not_validated():
    check = Validation("accuracy", 3 / 269, 0.0, False, "cpu", 269, decisions=269, lost=3)
    text = render(print_compress, report([layer("/a/MatMul")], validation=check), written=False)
    assert "samples lost: 3 (1.1%) of 269 held-out (cpu), ABOVE the tolerance 0%" in text
    assert "NOT VALIDATED" not in text


def test_not_validated_only_when_something_unchecked_was_written():
    assert "NOT VALIDATED" not in render(print_compress, report(), written=True)  # nothing changed
    assert "NOT VALIDATED" not in render(print_compress, report([layer("/a/MatMul")]), written=False)
    quantized = report(quantization=Quantization(scheme="int8", bytes_factorized=4096, bytes_quantized=1024,
                                                 error_factorized=None, error_quantized=None,
                                                 error_quantized_alone=None, nodes={}, range=None, range_reason=None))
    text = render(print_compress, quantized, written=True)
    assert "only the int8 quantization changed the model" in text
    assert "The int8 quantization's error was not measured either." in not_validated_text(quantized)
    assert paragraph(text, "NOT VALIDATED").endswith("(it also makes the factorization data-aware).")


def test_int8_lines_name_the_range():
    q = Quantization(scheme="int8", bytes_factorized=2_227_156, bytes_quantized=600_000, error_factorized=0.004,
                     error_quantized=0.006, error_quantized_alone=None, nodes={}, range="reduced",
                     range_reason="auto: this CPU has no VNNI")
    check = Validation("cosine", 0.006, 0.01, True, "cpu", 100)
    text = render(print_compress, report([layer("/a/MatMul")], validation=check, quantization=q), written=True)
    assert ("int8 (reduced range: auto: this CPU has no VNNI): 2.12 MiB factorized → 585.94 KiB with int8; "
            "cosine 0.004 factorized → 0.006 with int8") in " ".join(text.split())
    q = dataclasses.replace(q, range=None, range_reason=None)
    text = render(print_compress, report([layer("/a/MatMul")], validation=check, quantization=q), written=True)
    assert "int8: 2.12 MiB factorized → 585.94 KiB with int8" in text


def test_latency_line_or_why_it_was_not_timed():
    timed = Latency("cpu", 8, None, runs=50, original=Timing(2.0, 1.9, 2.2, 50), compressed=Timing(1.0, 0.9, 1.1, 50),
                    speedup=2.0)
    text = render(print_compress, report([layer("/a/MatMul")], latency=timed), written=True)
    assert "latency (cpu, batch 8, median of 50 runs): 2 ms → 1 ms (2.00x)" in " ".join(text.split())
    failed = Latency("cpu", 8, None, error="onnxruntime could not time the models with every optimization on: boom")
    text = render(print_compress, report([layer("/a/MatMul")], latency=failed), written=True)
    assert ("latency (cpu, batch 8): onnxruntime could not time the models with every optimization on: boom"
            in " ".join(text.split()))


# ------------------------------------------------------------------------------------------ the tables


def test_op_table_lists_changed_op_types_and_sums_up_the_rest():
    rep = report([layer("/a/MatMul")], ops_before={"MatMul": 4, "Gather": 1, "Add": 3, "Relu": 2},
                 ops_after={"MatMul": 8, "Gather": 2, "Add": 3, "Relu": 2})
    model = dict(table(render(print_compress, rep, written=True), "Model", 6))
    assert model["Gather nodes"] == ["1", "2", "+1"] and model["MatMul nodes"] == ["4", "8", "+4"]
    assert model["other nodes (2 op types)"] == ["5", "5", ""]
    assert model["bytes"] == ["4.71 MiB", "2.12 MiB", "45.1%"]
    unchanged = report(ops_before={"Add": 3, "Relu": 2}, ops_after={"Add": 3, "Relu": 2})
    model = dict(table(render(print_compress, unchanged, written=True), "Model", 4))
    assert model["nodes (2 op types)"] == ["5", "5", ""]


def test_layers_left_as_they_were_are_grouped_by_reason():
    skipped = [SkippedLayer(f"/encoder/layer.{i}/attention/self/MatMul", "MatMul",
                            "no constant weight (both inputs are computed)") for i in range(3)]
    skipped.append(SkippedLayer("/embeddings/token_type_embeddings/Gather", "Gather", "no rank that shrinks it"))
    text = render(print_compress, report([layer("/a/MatMul")], skipped), written=True)
    assert "Left as they were (4)" in text
    assert text.count("no constant weight (both inputs are computed):") == 1
    for entry in skipped:
        assert any(entry.node in line and entry.op in line for line in text.splitlines())


def test_a_name_longer_than_the_console_wraps_whole():
    name = "/" + "/".join(f"segment_{i:02d}_of_a_very_deep_graph" for i in range(6)) + "/MatMul"
    timed = layer(name, sensitivity=0.5, latency={"dense_ms": 1.0, "factorized_ms": 0.5})  # room for no name
    text = render(print_compress, report([timed], [SkippedLayer(name + "_1", "MatMul", "kept dense")]), written=True)
    (shown, _), = table(text, "Factorized layers", 1)
    assert shown == name
    assert name + "_1" in "".join(line.strip() for line in text.splitlines())


@pytest.mark.parametrize("check, expected", [
    # the promise for new inputs above the tolerance the held-out samples are within: said plainly
    (Validation("top1", 0.0, 0.01, True, "cpu", 120, confidence=0.95, unseen_bound=0.0247, decisions=120, lost=0,
                ties_exempt=False, accept="value"),
     "decisions changed: 0 of 120 held-out (cpu), within the tolerance 1%\n"
     "with 95% confidence at most 2.5% of new decisions change: ABOVE the tolerance 1%, which only the "
     "held-out samples are within (--accept bound accepts only a promise within it)"),
    (Validation("cosine", 0.048, 0.05, True, "cpu", 100, confidence=0.95, unseen_bound=0.104, accept="value"),
     "cosine 0.048 on 100 held-out samples (cpu), within the tolerance 0.05\n"
     "with 95% confidence at most 0.11 on new inputs: ABOVE the tolerance 0.05, which only the held-out samples "
     "are within (--accept bound accepts only a promise within it)"),
    # near-ties changed: counted (the default for a positive tolerance) or exempt, named either way
    (Validation("top1", 5 / 300, 0.01, False, "cpu", 300, decisions=300, lost=5, ties=7, ties_lost=2,
                ties_exempt=False),
     "decisions changed: 5 (1.7%) of 300 held-out (cpu), 2 of them near-ties (counted), ABOVE the tolerance 1%\n"
     "near-ties: 7 calibration decisions (may flip either way; counted against the tolerance, 2 of them lost)"),
    (Validation("top1", 3 / 300, 0.01, True, "cpu", 300, decisions=300, lost=5, ties=7, ties_lost=2,
                ties_exempt=True),
     "decisions changed: 5 (1.7%) of 300 held-out (cpu), 2 of them near-ties (exempt): 3 counted, within the "
     "tolerance 1%\n"
     "near-ties: 7 calibration decisions (may flip either way; not held against the tolerance, 2 of them lost)"),
    # the margins' prediction is what was held
    (Validation("top1", 0.02, 0.01, False, "cpu", 300, decisions=300, lost=1, threatened=8, calibration_decisions=400,
                predicted_unseen=0.02, ties_exempt=False),
     "decisions changed: 1 (0.33%) of 300 held-out (cpu)\n"
     "held against the tolerance: 2% of calibration decisions predicted to change (margins threatened, below), "
     "ABOVE the tolerance 1%\n"
     "margins threatened: 8 of 400 calibration decisions"),
])
def test_validation_says_what_was_counted_and_what_the_promise_is(check, expected):
    """Issue 30, item 2: the result line names what was counted and what was exempt, and a promise for new
    inputs above the tolerance is said to be."""
    assert validation_text(check) == expected


def test_pruned_and_head_rows_say_what_their_cells_mean():
    """Issue 30, item 8: a pruned pair's row gives the channels it keeps, not a "rank", and a speedup cell
    left empty says why (pruning and heads are never timed: the same ops on smaller matrices)."""
    timed = {"dense_ms": 0.5, "factorized_ms": 0.25}
    layers = [layer("/l0/intermediate/dense/MatMul", rank=848, method="prune", shape=[384, 1536], sensitivity=5.6),
              layer("/l0/attention/self/query/MatMul", rank=192, method="heads", sensitivity=2.1),
              layer("/l0/attention/output/dense/MatMul", rank=128, method="svd-data", sensitivity=0.03,
                    latency=timed)]
    text = render(print_compress, report(layers), written=True, width=100)
    pruned, heads, svd = (cells for _, cells in table(text, "Factorized layers", len(layers)))
    assert "848 ch" in pruned and "848" not in heads and "192" in heads
    assert pruned[-1] == "—" and heads[-1] == "—" and svd[-1] == "2.00x"
    legend = " ".join(text.split())
    assert "ch: the channels a pruned pair keeps between its layers" in legend
    assert "—: not timed: pruned channels and heads run the same ops on smaller matrices" in legend


def test_block_layers_show_their_block_and_an_eight_bit_correction():
    """The layer table names a block layer's scheme: int4 with its block size, `c8` where its correction is
    stored in 8 bits, svd-int4 at its rank; the legend explains both."""
    def block(node, method, rank, correction_bits):
        return layer(node, rank=rank, method=method, bytes_before=589_824, bytes_after=90_000,
                     quantization={"bits": 4, "block": 32, "correction_rank": 0 if method != "int4" else rank,
                                   "correction_bits": correction_bits})

    text = render(print_compress, report([block("/a/MatMul", "int4", 16, 8), block("/b/MatMul", "int4", 16, 16),
                                          block("/c/MatMul", "svd-int4", 48, 0)]), written=True)
    rows: dict[str, str] = {}
    for line in text.splitlines():  # each layer's row: the first line naming it
        for name in ("/a/MatMul", "/b/MatMul", "/c/MatMul"):
            if name in line:
                rows.setdefault(name, line)
    assert "int4 b32 c8" in rows["/a/MatMul"] and "c8" not in rows["/b/MatMul"] and "int4 b32" in rows["/b/MatMul"]
    assert "svd-int4 b32" in rows["/c/MatMul"] and " 48 " in rows["/c/MatMul"]
    assert "c8: its factors in 8 bits" in " ".join(text.split()) and "svd-int4 / svd-int8" in text
