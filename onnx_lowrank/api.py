"""The Python API: `compress` and `compress_file`, configured by one typed `Options` object.

Ranks come from one of: explicit `ranks`, an `energy` threshold, a parameter budget (`target_params`,
size mode) or, with calibration data and none of those, the fewest parameters whose validated error is
within `tolerance` (compact mode). With calibration data the factors are data-aware (unless `no_data`)
and the result is validated in ONNX Runtime on held-out samples.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from .graph.model_io import LoadedModel, check_output_path, load_model, save_model
from .options import Options
from .report import Report
from .run.progress import Progress
from .run.records import Given, Run
from .run.stages import compress_run


def compress(
    model_or_path: onnx.ModelProto | str | os.PathLike, calibration=None, labels=None, **options
) -> tuple[onnx.ModelProto, Report]:
    """Factorize the model's layers; return the new model and a report. The input is never modified.

    `calibration`: a path (.npz of stacked samples, or a folder of .npz feeds), an onnxruntime
    CalibrationDataReader, a dict of stacked arrays or an iterable of feed dicts. `labels`: a path to an
    .npy or an array, one per sample (for the accuracy metric). `options` are the fields of `Options`.
    Raises InputError for unusable input, BoundNotMet when the tolerance cannot be met.
    """
    settings = Options(**options)
    return _compress(load_model(model_or_path), settings, calibration, labels)


def compress_file(
    input_path: str | os.PathLike, output_path: str | os.PathLike, calibration=None, labels=None, **options
) -> Report:
    """Compress a model file into another, atomically; external data is kept when the input had it.

    Options, model and output path are all checked before any work is done; nothing is written when
    the run fails (BoundNotMet included).
    """
    settings = Options(**options)
    loaded = load_model(input_path, lazy=True)
    output = check_output_path(output_path, loaded.path)
    if calibration is not None or settings.quantize:  # ONNX Runtime and the quantizer need the weights in
        loaded = loaded.materialized()
    model, report = _compress(loaded, settings, calibration, labels)
    # a model whose weights stay in the input's files is checked as written
    check = loaded.shapes_consistent if loaded.base_dir else None
    save_model(model, output, external_data=loaded.external_data, base_dir=loaded.base_dir, check=check)
    return report


def _compress(loaded: LoadedModel, settings: Options, calibration, labels) -> tuple[onnx.ModelProto, Report]:
    with Progress(settings.progress) as progress, tempfile.TemporaryDirectory(prefix="onnx-lowrank-") as work:
        return compress_run(Run(Given(settings, loaded, calibration, labels, Path(work)), progress))
