"""The package's architecture, checked: the core reads as plain PyTorch without the engines
wing or numba, and no module imports another module's private names."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gradlab"
CORE = ("config", "data", "models", "record", "train", "store", "activations", "compat")


def modules():
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_name_is_imported_from_another_module(path):
    tree = ast.parse(path.read_text())
    bad = [f"{node.module}.{alias.name}" for node in ast.walk(tree)
           if isinstance(node, ast.ImportFrom) and node.level > 0
           for alias in node.names if alias.name.startswith("_") and alias.name != "__version__"]
    assert not bad, f"{path.name} imports private names: {bad}"


@pytest.mark.parametrize("name", CORE)
def test_core_modules_do_not_import_the_engines_at_module_level(name):
    module = PACKAGE / f"{name}.py"  # a package: each of its modules
    paths = [module] if module.exists() else sorted((PACKAGE / name).glob("*.py"))
    assert paths
    top = [node for path in paths for node in ast.parse(path.read_text()).body
           if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = [getattr(node, "module", None) or "" for node in top]
    names += [alias.name for node in top for alias in node.names]
    assert not [n for n in names if "engines" in n or "numba" in n], names


@pytest.mark.slow  # a real process
def test_importing_the_core_and_the_figures_imports_no_numba():
    code = ("import sys, gradlab.train, gradlab.record, gradlab.plots, gradlab.store, "
            "gradlab.sweep, gradlab.report, gradlab.cli; "
            "bad = [m for m in sys.modules if m == 'numba' or m.startswith('gradlab.engines')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow  # a real process
def test_config_and_the_activation_names_import_without_torch():
    """``gradlab --help`` reads them: it must not pay for importing torch."""
    code = ("import sys, gradlab.config, gradlab.activations, gradlab.options; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stdout + done.stderr
