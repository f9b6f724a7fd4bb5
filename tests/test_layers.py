"""Import rules of STYLE.md, checked in fresh interpreters."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "homespec"


def test_import_homespec_loads_no_heavy_modules() -> None:
    code = (
        "import sys, homespec; print(','.join(m for m in ('torch','zmq','textual','transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_core_is_stdlib_only() -> None:
    allowed = set(sys.stdlib_module_names) | {"homespec"}
    for file in (PACKAGE / "core").glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            for root in roots:
                assert root in allowed, f"{file.name} imports {root}"
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("homespec."):
                # core may raise the typed errors (homespec/errors.py is stdlib-only itself)
                ours = node.module.startswith(("homespec.core", "homespec.errors"))
                assert ours, f"{file.name} imports {node.module}"


def test_model_layer_never_imports_transport_pipeline_or_faces() -> None:
    banned = ("homespec.transport", "homespec.pipeline", "homespec.server", "homespec.cli", "homespec.engine", "zmq")
    for file in (PACKAGE / "model").rglob("*.py"):
        source = file.read_text()
        for name in banned:
            assert f"import {name}" not in source and f"from {name}" not in source, f"{file} uses {name}"


def test_core_passes_mypy_strict() -> None:
    """``mypy --strict`` (pyproject.toml's settings) on the whole package and the TUI: no error, no ignore unused."""
    root = PACKAGE.parent
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(root / ".mypy_cache"), "homespec", "tui"],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_transport_never_imports_torch_or_model() -> None:
    for file in (PACKAGE / "transport").rglob("*.py"):
        source = file.read_text()
        for name in ("torch", "transformers", "homespec.model"):
            assert f"import {name}" not in source and f"from {name}" not in source, f"{file} uses {name}"


def test_server_talks_to_the_engine_only() -> None:
    """The server is a face: it reaches the model through ``engine``/``batching`` and their events, never the
    pipeline, the model code or the wire directly."""
    banned = ("homespec.pipeline", "homespec.model", "homespec.transport", "zmq", "torch")
    for file in (PACKAGE / "server").rglob("*.py"):
        source = file.read_text()
        for name in banned:
            assert f"import {name}" not in source and f"from {name}" not in source, f"{file} uses {name}"


def test_tui_talks_to_the_engine_only() -> None:
    """The TUI is a consumer (STYLE 9): engine, events (and the config and errors they speak), never the pipeline,
    the model code, the wire, the server or the CLI."""
    tui = PACKAGE.parent / "tui"
    banned = (
        "homespec.pipeline",
        "homespec.model",
        "homespec.transport",
        "homespec.server",
        "homespec.cli",
        "zmq",
        "torch",
    )
    files = list(tui.rglob("*.py"))
    assert files
    for file in files:
        source = file.read_text()
        for name in banned:
            assert f"import {name}" not in source and f"from {name}" not in source, f"{file} uses {name}"


def test_a_stage_loads_without_transformers() -> None:
    """A stage process reads config.json itself and computes its own RoPE (model/rope.py): importing transformers'
    model code would cost it more than torch."""
    code = (
        "import sys; from homespec.model.loader import resolve; from homespec.model.stage import Stage;"
        "Stage(resolve(None), 0, 30); print(any(m.startswith('transformers') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
