"""How this copy of onnx-lowrank is installed: its version, and the command that adds an optional extra.

From a source checkout (the package folder's parent holds the pyproject.toml of onnx-lowrank: an editable
install, or running in the tree) the extra comes from that folder: `cd FOLDER && pip install '.[html]'`,
with `-e` when the checkout is installed editable (a plain install would replace the editable one with a
copy). Anywhere else it comes from the package index: `pip install 'onnx-lowrank[html]'`.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import unquote, urlparse

DISTRIBUTION = "onnx-lowrank"
PACKAGE_DIR = Path(__file__).resolve().parent


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project(root: Path) -> dict:
    """The [project] table of root/pyproject.toml ({} when there is none or it does not parse)."""
    try:
        with open(root / "pyproject.toml", "rb") as file:
            project = tomllib.load(file).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    return project if isinstance(project, dict) else {}


def source_checkout(package_dir: str | Path | None = None) -> Path | None:
    """The checkout the package at `package_dir` (default: this one) runs from, or None when it is installed."""
    root = Path(PACKAGE_DIR if package_dir is None else package_dir).resolve().parent
    name = _project(root).get("name")
    return root if isinstance(name, str) and _normalized(name) == DISTRIBUTION else None


def _editable_from(root: Path) -> bool:
    """Whether an installed onnx-lowrank is an editable install of `root` (pip's direct_url.json)."""
    for distribution in importlib.metadata.distributions(name=DISTRIBUTION):
        try:
            origin = json.loads(distribution.read_text("direct_url.json") or "{}")
        except (OSError, ValueError):
            continue
        url = urlparse(origin.get("url", ""))
        if origin.get("dir_info", {}).get("editable") and url.scheme == "file":
            if Path(unquote(url.path)).resolve() == root:
                return True
    return False


def install_hint(extra: str, package_dir: str | Path | None = None) -> str:
    """The command that installs an optional extra ("html", "cp", "dask", "gpu") into this copy, one line
    to paste into a shell."""
    root = source_checkout(package_dir)
    if root is None:
        return f"pip install '{DISTRIBUTION}[{extra}]'"
    editable = "-e " if _editable_from(root) else ""
    return f"cd {shlex.quote(str(root))} && pip install {editable}'.[{extra}]'"


def version(package_dir: str | Path | None = None) -> str:
    """This copy's version: a checkout's pyproject.toml (what runs, even if not reinstalled since a bump),
    else the installed metadata, else "unknown"."""
    root = source_checkout(package_dir)
    if root is not None:
        found = _project(root).get("version")
        if isinstance(found, str):
            return found
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
