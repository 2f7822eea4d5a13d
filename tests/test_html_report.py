"""`--html`: the standalone HTML report (onnx_lowrank.cli.main.html.render_html).

Reports come from real runs on the shipped digits CNN: one calibrated (compact mode, accuracy,
tolerance 0) and one minimal (size mode, no calibration). Fields the pipeline may not fill yet
(spectra, per-layer and end-to-end latency, the chosen point, the factorizable size, quantization) are
filled by hand on a copy from plausible values (spectra: the real weights' singular values) so that
every section is drawn; a node name carrying `<script>` checks the escaping.

The page is then opened in headless Chromium over the DevTools protocol (a pipe, stdlib only): no
console errors or uncaught exceptions, every embedded image decodes, nothing overflows the window
sideways, and the full-page screenshot is not blank. A deliberately broken page checks that those
checks do catch errors. The browser tests skip when no Chromium/Chrome binary is found.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import html.parser
import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnx_lowrank
from onnx_lowrank.cli import html as html_report
from onnx_lowrank.cli.html import render_html
from onnx_lowrank.errors import InputError
from onnx_lowrank.report import (
    Chosen,
    FallbackSearch,
    FallbackStep,
    Latency,
    Quantization,
    Report,
    SkippedLayer,
    Timing,
    TracePoint,
    Validation,
)

matplotlib_image = pytest.importorskip("matplotlib.image", reason="the HTML report needs matplotlib")

MODELS = Path(__file__).resolve().parents[1] / "models"
DIGITS = MODELS / "digits_cnn.onnx"
CALIB = MODELS / "digits_calib.npz"
LABELS = MODELS / "digits_calib_labels.npy"
EVIL = '<script>alert("x")</script>&"\'$x$'
DATA_PNG = re.compile(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


# ------------------------------------------------------------------------------------------ reports


# method svd: `auto` also tries every Conv decomposition, 30 s to minutes on a loaded 2-core machine


@pytest.fixture(scope="module")
def calibrated() -> Report:
    _, report = onnx_lowrank.compress(
        DIGITS, calibration=CALIB, labels=LABELS, metric="accuracy", tolerance=0.05, target_params=0.5,
        method="svd", jobs=1, objective="size")  # size mode: three layers factorized, whatever lossless allows
    return report


@pytest.fixture(scope="module")
def minimal() -> Report:
    _, report = onnx_lowrank.compress(DIGITS, target_params=0.5, method="svd", jobs=1, objective="size")
    return report


def _weights() -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in onnx.load(DIGITS).graph.initializer}


def _spectrum(weight: np.ndarray) -> list[float]:
    energy = np.linalg.svd(weight.reshape(weight.shape[0], -1).astype(np.float64), compute_uv=False) ** 2
    return (energy / energy.sum()).tolist()


def filled(report: Report) -> Report:
    """A copy with every section's data present: the pipeline's where it gave it, plausible otherwise."""
    weights = _weights()
    layers = []
    for i, layer in enumerate(report.layers):
        layer = dataclasses.replace(
            layer,
            spectrum=layer.spectrum or _spectrum(weights[layer.weight]),
            latency=layer.latency or {"dense_ms": 0.05 + 0.02 * i, "factorized_ms": 0.04 + 0.01 * i},
        )
        layers.append(layer)
    layers[0] = dataclasses.replace(layers[0], node=EVIL, nodes=[EVIL, "/shared/" + EVIL])
    if len(layers) > 1:  # a multi-stage rank, as Tucker-2 reports it
        layers[1] = dataclasses.replace(layers[1], method="tucker2", rank=[24, 16])
    if len(layers) > 2:
        layers[2] = dataclasses.replace(layers[2], sensitivity=float("nan"), predicted_error=float("inf"))
    node_weight = {node.name: node.input[1] for node in onnx.load(DIGITS).graph.node if len(node.input) > 1}
    skipped_params = sum(weights[node_weight[s.node]].size for s in report.skipped if s.node in node_weight)
    factorizable = report.factorizable_params or sum(layer.params_before for layer in report.layers) + skipped_params
    trace = report.trace + [TracePoint(params=report.trace[0].params // 2, error=float("inf"), samples=135)]
    final = max(report.trace, key=lambda p: (p.samples, -p.params))
    return dataclasses.replace(
        report,
        layers=layers,
        skipped=[*report.skipped, SkippedLayer(node=EVIL, op="MatMul", reason="too small: " + EVIL)],
        trace=trace,
        factorizable_params=factorizable,
        chosen=report.chosen or Chosen(params=final.params, error=final.error),
        latency=report.latency or Latency(
            provider="cpu", batch=1, threads=1, runs=50, speedup=1.31,
            original=Timing(median_ms=0.42, p10_ms=0.40, p90_ms=0.49, runs=50),
            compressed=Timing(median_ms=0.32, p10_ms=0.30, p90_ms=0.38, runs=50),
        ),
        quantization=report.quantization or Quantization(
            scheme="int8-per-channel", bytes_factorized=report.bytes_after,
            bytes_quantized=report.bytes_after // 4 + 2000, error_factorized=0.0,
            error_quantized=0.0037, error_quantized_alone=None, nodes=5, range=None, range_reason=None,
            fallback_nodes=[FallbackStep(node=EVIL, op="Gemm", scheme="weight-only", error_reduction=0.0123,
                                         extra_bytes=1280, error_after=0.0021)],
            fallback=FallbackSearch(share=0.006, error_int8_all=0.0144, error_int8_fallback=0.0021,
                                    nodes_measured=4, checks=2, seconds=1.5),
        ),
    )


def expected_images(report: Report) -> int:
    """Plots the report's data calls for: ranks, spectra, search trace, latency."""
    trace = [p for p in report.trace if np.isfinite(p.params) and np.isfinite(p.error)]
    return (bool(report.layers) + any(layer.spectrum for layer in report.layers) + bool(trace)
            + bool(report.latency and report.latency.original))


# ------------------------------------------------------------------------------------------ checks


class _Structure(html.parser.HTMLParser):
    """Open/close balance of the non-void elements, and every tag seen."""

    VOID = {"meta", "img", "br", "hr", "input", "link", "col", "wbr"}

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.problems: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def check_page(page: str, images: int) -> list[str]:
    """Structure, escaping and embedded images of a rendered page; returns the image payloads."""
    assert page.startswith("<!DOCTYPE html>")
    structure = _Structure()
    structure.feed(page)
    structure.close()
    assert not structure.problems and not structure.stack, (structure.problems, structure.stack)
    assert "script" not in structure.tags  # no JavaScript at all, injected or ours
    assert not re.search(r"<script", page, re.IGNORECASE)
    assert not re.search(r'(?:src|href)="(?!data:image/png;base64,|#)', page)  # nothing external
    assert "http://" not in page and "https://" not in page
    payloads = DATA_PNG.findall(page)
    assert structure.tags.count("img") == len(payloads) == images
    for payload in payloads:
        pixels = matplotlib_image.imread(io.BytesIO(base64.b64decode(payload, validate=True)), format="png")
        assert pixels.shape[0] > 50 and pixels.shape[1] > 200 and pixels.std() > 0.05
    return payloads


def test_full_report_has_every_section(calibrated):
    report = filled(calibrated)
    page = render_html(report, title="digits <cnn>.onnx")
    check_page(page, images=4)
    assert expected_images(report) == 4
    assert "<h1>digits &lt;cnn&gt;.onnx</h1>" in page
    assert report.layers and report.skipped
    for heading in ("Summary", "Before and after", "Nodes by op type", "Validation", f"Factorized ({len(report.layers)})",
                    f"Skipped ({len(report.skipped)})", "Chosen ranks", "Singular spectra", "Rank search", "Latency",
                    "Quantization", "int8 fallback", "Time per phase"):
        assert f">{heading}</h" in page, heading
    # escaped wherever a user name lands: table cells, tooltips, the skip reason
    assert EVIL not in page and "alert(" in page
    escaped = '&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&quot;&#x27;$x$'
    assert page.count(escaped) >= 5
    # the numbers the reader looks for
    latency, quantization, first = report.latency, report.quantization, report.layers[0].latency
    for text in (f"{report.params_before:,}", f"{report.params_after:,}", "accuracy", "passed", "cpu",
                 f"{report.validation.samples:,}", f"×{latency.speedup:.2f}",
                 f"{latency.original.median_ms:,.3f} ms", f"{latency.compressed.p90_ms:,.3f} ms",
                 f"<code>{quantization.scheme}</code>", "tucker2", "24, 16", "first stage", "n/a", "∞",
                 f"{first['dense_ms']:,.3f} → {first['factorized_ms']:,.3f} ms", "0.0123", "1.25 KiB", "weight-only",
                 "int8 of every node: error 0.0144"):
        assert text in page, text
    for layer in report.layers:
        assert f"{layer.params_before:,} → {layer.params_after:,}" in page
    for phase in report.phases:
        assert f"<td>{phase}</td>" in page
    assert page.count("<table") >= 10


def test_real_reports_render_whatever_the_pipeline_filled(calibrated, minimal):
    for report in (calibrated, minimal):
        page = render_html(report)
        check_page(page, images=expected_images(report))
        for layer in report.layers:
            assert f"{layer.params_before:,} → {layer.params_after:,}" in page
        for skipped in report.skipped:
            assert skipped.reason in page


def test_minimal_report_degrades_gracefully(minimal):
    assert minimal.validation is None and not minimal.trace and minimal.latency is None
    page = render_html(minimal.to_dict())  # the JSON form renders too
    check_page(page, images=expected_images(minimal))
    for note in ("Not validated", "No rank search: without calibration data", "Not measured", "Not quantized"):
        assert note in page, note
    assert "no bound" in page

    checked = dataclasses.replace(minimal, validation=Validation("mse", 0.01, None, None, "cpu", 64))
    page = render_html(checked)
    assert "the ranks were given (size mode)" in page and "none asked for" in page and "no bound" in page

    empty = dataclasses.replace(minimal, layers=[], skipped=[], phases={}, ops_before={}, ops_after={})
    page = render_html(empty)
    check_page(page, images=0)
    assert "Nothing was factorized." in page and "No candidate layer was skipped." in page


def test_many_layers_are_capped(minimal, monkeypatch):
    assert 12 <= html_report.MAX_SPECTRA <= html_report.MAX_RANK_BARS
    monkeypatch.setattr(html_report, "MAX_SPECTRA", 3)  # the same code path as 24 of 80, drawn faster
    monkeypatch.setattr(html_report, "MAX_RANK_BARS", 4)
    layer = dataclasses.replace(minimal.layers[0], spectrum=_spectrum(_weights()[minimal.layers[0].weight]))
    layers = [dataclasses.replace(layer, node=f"/block.{i}/conv", params_before=layer.params_before + i)
              for i in range(6)]
    page = render_html(dataclasses.replace(minimal, layers=layers))
    check_page(page, images=2)
    assert "Showing the 3 largest of 6 layers" in page and "Showing the 4 largest of 6 layers" in page
    assert "/block.5/conv" in page  # the table keeps them all


def test_without_matplotlib_names_the_extra(minimal, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(InputError, match=r"pip install (-e )?'(onnx-lowrank|\.)\[html\]'"):
        render_html(minimal)


# ------------------------------------------------------------------------------------------ browser


def _chromium() -> str | None:
    for candidate in (os.environ.get("CHROME_BIN"), "chromium", "chromium-browser", "google-chrome",
                      "google-chrome-stable", "chrome", "headless_shell"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4 of the child)."""

    WIDTH, HEIGHT = 1280, 900

    def __init__(self, binary: str, profile: Path):
        commands_r, self._commands = os.pipe()
        self._replies, replies_w = os.pipe()

        def wire():  # in the child: its fd 3 reads our commands, its fd 4 writes the replies
            high_r = fcntl.fcntl(commands_r, fcntl.F_DUPFD_CLOEXEC, 10)
            high_w = fcntl.fcntl(replies_w, fcntl.F_DUPFD_CLOEXEC, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--hide-scrollbars", "--mute-audio",
             f"--window-size={self.WIDTH},{self.HEIGHT}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=wire,
        )
        os.close(commands_r)
        os.close(replies_w)
        self._next = 0
        self._buffer = b""
        self.events: list[dict] = []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable", session=True)
        self.send("Emulation.setDeviceMetricsOverride", session=True, width=self.WIDTH, height=self.HEIGHT,
                  deviceScaleFactor=1, mobile=False)

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._replies, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, session: bool = False, timeout: float = 30, **params) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _wait_for(self, event: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == event for e in self.events):
            self.events.append(self._message(deadline))

    def load(self, path: Path) -> dict:
        """Open the page; its console errors, uncaught exceptions, image and layout facts, screenshot."""
        self.events = []
        self.send("Page.navigate", session=True, url=path.resolve().as_uri())
        self._wait_for("Page.loadEventFired")
        facts = json.loads(self.send("Runtime.evaluate", session=True, returnByValue=True, expression="""
            JSON.stringify({
              images: document.images.length,
              broken: Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length,
              width: document.documentElement.scrollWidth,
              clipped: Array.from(document.querySelectorAll(".scroll"))
                .filter(e => e.scrollWidth > e.clientWidth + 1).length,
              height: document.documentElement.scrollHeight,
              text: document.body ? document.body.innerText.length : 0,
            })""")["result"]["value"])
        height = min(facts["height"], 12000)
        shot = self.send("Page.captureScreenshot", session=True, format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": self.WIDTH, "height": height, "scale": 1})
        facts["screenshot"] = base64.b64decode(shot["data"])
        facts["errors"] = errors_in(self.events)
        return facts

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        os.close(self._replies)


def errors_in(events: list[dict]) -> list[str]:
    """Console errors, failed assertions, uncaught exceptions and error-level log entries (CSP
    violations, failed loads)."""
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            found.append("exception: " + details.get("exception", {}).get("description", details.get("text", "")))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            found.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            found.append("log: " + params["entry"]["text"])
    return found


def blank(png: bytes) -> bool:
    """Whether a screenshot shows (next to) nothing: almost all pixels one colour."""
    pixels = matplotlib_image.imread(io.BytesIO(png), format="png")[..., :3]
    luminance = pixels.mean(axis=2)
    background = np.median(luminance)
    return float(np.mean(np.abs(luminance - background) > 0.1)) < 0.01 or float(luminance.std()) < 0.02


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium or chrome binary found (set CHROME_BIN): the rendering check needs one")
    chromium = Browser(binary, tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


def test_report_renders_in_chromium(browser, calibrated, minimal, tmp_path):
    for name, report, images in (("full", filled(calibrated), 4), ("minimal", minimal, expected_images(minimal))):
        path = tmp_path / f"{name}.html"
        path.write_text(render_html(report), encoding="utf-8")
        page = browser.load(path)
        assert page["errors"] == [], name
        assert page["images"] == images and page["broken"] == 0, name
        assert page["width"] <= Browser.WIDTH, f"{name}: the page overflows sideways"
        assert page["clipped"] == 0, f"{name}: a table needs scrolling at {Browser.WIDTH} px"
        assert page["text"] > 500, name
        assert not blank(page["screenshot"]), name
        (tmp_path / f"{name}.png").write_bytes(page["screenshot"])


def test_browser_check_catches_errors(browser, minimal, tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text(
        '<!DOCTYPE html><html><body><p>broken</p><img src="data:image/png;base64,AAAA">'
        '<script>console.error("deliberate console error"); notDefined();</script></body></html>')
    page = browser.load(broken)
    assert any("deliberate console error" in e for e in page["errors"]), page["errors"]
    assert any("ReferenceError" in e and "notDefined" in e for e in page["errors"]), page["errors"]
    assert page["broken"] == 1

    # a script slipped into a report is refused by its Content-Security-Policy, and that is reported
    injected = tmp_path / "injected.html"
    injected.write_text(render_html(minimal).replace("<main>", '<main><script>console.error("ran")</script>', 1))
    page = browser.load(injected)
    assert page["errors"] and not any("ran" == e.removeprefix("console: ") for e in page["errors"]), page["errors"]
    assert any("Content Security Policy" in e for e in page["errors"]), page["errors"]

    empty = tmp_path / "empty.html"
    empty.write_text("<!DOCTYPE html><html><body></body></html>")
    page = browser.load(empty)
    assert page["errors"] == [] and blank(page["screenshot"])


def test_validation_card_reads_as_the_comparison_it_is(minimal):
    """A failed run's card says "top1 0.1822 > 0.01", not "≤" (issue 30, item 3); a passed one "≤"."""
    failed = Validation("top1", 0.1822, 0.01, False, "cpu", 64, confidence=0.95, unseen_bound=0.25)
    card = re.search(r'<div class="label">Validation</div>.*?</div></div>', render_html(
        dataclasses.replace(minimal, validation=failed)), re.S).group(0)
    assert "failed" in card and "top1 0.1822 &gt; 0.01" in card and "≤" not in card
    passed = Validation("top1", 0.004, 0.01, True, "cpu", 64, confidence=0.95, unseen_bound=0.03)
    card = re.search(r'<div class="label">Validation</div>.*?</div></div>', render_html(
        dataclasses.replace(minimal, validation=passed)), re.S).group(0)
    assert "passed" in card and "top1 0.004 ≤ 0.01" in card
    by_bound = dataclasses.replace(passed, passed=False)  # --accept bound: within the tolerance, not its promise
    card = re.search(r'<div class="label">Validation</div>.*?</div></div>', render_html(
        dataclasses.replace(minimal, validation=by_bound)), re.S).group(0)
    assert "top1 0.004 ≤ 0.01; for new inputs up to 0.03 &gt; 0.01" in card
