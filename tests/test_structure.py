"""The package's structure as CONTRIBUTING.md states it: layers that import only downward
(the import-linter contract in .importlinter, checked by import-linter itself), the
package's own imports at module top, and a folder contract that matches the tree."""

from __future__ import annotations

import ast
import configparser
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rnope_megatron"
LINT_IMPORTS = pathlib.Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.unit


def _lint(tree: pathlib.Path) -> subprocess.CompletedProcess:
    # import-linter reads the package from sys.path: point it at the tree under test.
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(tree / ".importlinter"), "--no-cache"],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=300)


def test_the_layer_contract_holds():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_layer_contract(tmp_path):
    """The contract is not vacuous: the model layer importing the trainer fails it."""
    shutil.copytree(PACKAGE, tmp_path / "rnope_megatron", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    pattern = tmp_path / "rnope_megatron" / "model" / "pattern.py"
    pattern.write_text(pattern.read_text() + "\nimport rnope_megatron.train.loop  # noqa: E402,F401\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "rnope_megatron.model is not allowed to import rnope_megatron.train" in result.stdout


def test_the_contract_lists_every_top_level_folder():
    """A new folder must take its place in the layers (import-linter ignores unlisted ones)."""
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    layers = config["importlinter:contract:layers"]["layers"]
    listed = {name.strip().split(".")[1] for line in layers.splitlines() for name in line.split("|") if name.strip()}
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == listed


# The one deferred import of the package's own code: rnope_megatron.build_model (PEP 562),
# so that importing any submodule does not pull Megatron in through the package's face.
DEFERRED_ON_PURPOSE = {("rnope_megatron/__init__.py", "rnope_megatron.model.build")}


def test_the_packages_own_imports_are_at_module_top():
    """Imports of rnope_megatron inside functions hide the graph (heavy optional third-party
    packages may be deferred; our own modules may not)."""
    nested = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            for sub in ast.walk(node):
                names = []
                if isinstance(sub, ast.ImportFrom) and sub.module:
                    names = [sub.module]
                elif isinstance(sub, ast.Import):
                    names = [alias.name for alias in sub.names]
                for name in names:
                    rel = str(path.relative_to(ROOT))
                    if name.startswith("rnope_megatron") and (rel, name) not in DEFERRED_ON_PURPOSE:
                        nested.append(f"{rel}:{sub.lineno} imports {name}")
    assert not nested, "\n".join(sorted(set(nested)))


def test_the_folder_contract_names_every_package_folder():
    """CONTRIBUTING.md's folder contract matches the tree: every folder of the package has a
    row, and every path a row names exists."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    contract = text[text.index("## Folder contract"):text.index("## Test tiers")]
    named = set(re.findall(r"`((?:rnope_megatron|recipes|examples|benchmarks|tools|tests|docs)/[^`]*)`", contract))
    for path in named:
        assert (ROOT / path.rstrip("/")).exists(), f"CONTRIBUTING.md names {path}, which does not exist"
    folders = {f"rnope_megatron/{p.name}/" for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders <= named, f"folders without a row: {sorted(folders - named)}"


def _console_entry_modules() -> list[str]:
    """The modules setup.py's console scripts start in."""
    setup = (ROOT / "setup.py").read_text()
    return sorted(set(re.findall(r"= (rnope_megatron[\w.]*):main", setup)))


def test_every_console_script_keeps_the_garbage_collector_out_of_its_imports():
    """Each console script's entry module calls start_console_imports() before its first
    import of the package's heavy modules and finish_console_imports() right after its
    last top-level import (common/cli.py: the collector paused while Megatron loads)."""
    modules = _console_entry_modules()
    assert len(modules) == 6, modules
    for module in modules:
        path = ROOT / (module.replace(".", "/") + ".py")
        body = ast.parse(path.read_text()).body
        calls = {node.value.func.id: index for index, node in enumerate(body)
                 if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                 and isinstance(node.value.func, ast.Name)}
        imports = [index for index, node in enumerate(body) if isinstance(node, (ast.Import, ast.ImportFrom))]
        assert "start_console_imports" in calls and "finish_console_imports" in calls, module
        heavy = [i for i in imports if i > calls["start_console_imports"]]
        assert heavy, f"{module}: no import after start_console_imports()"
        assert calls["finish_console_imports"] == max(imports) + 1, f"{module}: finish_console_imports() not right after the imports"


@pytest.mark.parametrize("collector_before", ["enabled", "disabled"])
def test_an_entry_modules_import_freezes_what_it_loaded_and_restores_the_collector(collector_before):
    """Importing an entry module leaves the collector as it found it, with the loaded
    modules' objects in its permanent generation (gc.freeze)."""
    code = ("import gc, sys\n"
            f"gc.{'enable' if collector_before == 'enabled' else 'disable'}()\n"
            "import rnope_megatron.plan.__main__\n"
            "print(gc.isenabled(), gc.get_freeze_count(), 'torch._inductor' in sys.modules)\n"
            "import warnings; warnings.warn('a warning of the user')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Megatron's notices on a CPU machine are quiet, whoever imported it first; others show
    assert proc.stderr.splitlines() == ["<string>:5: UserWarning: a warning of the user"], proc.stderr[-2000:]
    enabled, frozen, inductor_loaded = proc.stdout.split()
    assert enabled == str(collector_before == "enabled")
    assert int(frozen) > 100_000  # torch and Megatron's modules, classes and functions
    # compat/megatron_import.py: without CUDA, Megatron's import set up no torch.compile
    if torch.cuda.device_count() == 0:
        assert inductor_loaded == "False"
