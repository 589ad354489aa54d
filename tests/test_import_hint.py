"""Importing geko_core from a source checkout (no compiled core beside it) says so."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import geko_core
from geko_core._backend import source_tree_root

# A regular install has no import hook, so from a fresh clone's root the working directory
# (first on sys.path) shadows it. An editable install adds a hook that would send
# `geko_core` back to the real checkout: the child keeps only the standard finders.
CHILD = """
import importlib.machinery, sys
standard = (importlib.machinery.BuiltinImporter, importlib.machinery.FrozenImporter, importlib.machinery.PathFinder)
sys.meta_path[:] = [finder for finder in sys.meta_path if finder in standard]
import geko_core
print(geko_core.__file__)
from geko_core import SampleTable
"""


def copy_package(destination: Path) -> None:
    """The Python files of the installed package, without any compiled extension."""
    shutil.copytree(
        Path(geko_core.__file__).parent,
        destination / "geko_core",
        ignore=shutil.ignore_patterns("__pycache__", "_C.*.so", "_C.*.pyd", "_C.so", "_C.pyd"),
    )


def import_from(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD], cwd=folder, capture_output=True, text=True, timeout=120)


def test_importing_the_source_tree_names_it_and_says_what_to_do(tmp_path):
    copy_package(tmp_path)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "geko_core"\n')
    (tmp_path / "csrc").mkdir()
    out = import_from(tmp_path)
    assert out.returncode != 0
    assert out.stdout.splitlines()[0] == str(tmp_path / "geko_core" / "__init__.py")  # the copy was imported
    assert "CompiledCoreError" in out.stderr
    assert (
        f"you are importing the source tree at {tmp_path.resolve()}; "
        "run from another folder or install with `pip install -e .`"
    ) in out.stderr


@pytest.mark.parametrize("missing", ["pyproject.toml", "csrc"])
def test_a_package_without_its_checkout_gets_the_build_hint(tmp_path, missing):
    copy_package(tmp_path)
    if missing != "pyproject.toml":
        (tmp_path / "pyproject.toml").write_text('[project]\nname = "geko_core"\n')
    if missing != "csrc":
        (tmp_path / "csrc").mkdir()
    out = import_from(tmp_path)
    assert out.returncode != 0
    assert "geko_core._C could not be imported" in out.stderr and "pip install" in out.stderr
    assert "source tree" not in out.stderr


def test_a_working_install_is_not_taken_for_the_source_tree():
    # Here the compiled core loads (installed, or beside an editable checkout's sources).
    assert geko_core.compiled_core_error() is None
    assert source_tree_root() is None


def test_import_geko_core_without_the_compiled_core_still_works(tmp_path):
    # The operators register only with the compiled core: without it, `import geko_core`
    # itself must still succeed (so that `python -m geko_core.info` can report the problem).
    copy_package(tmp_path)
    code = CHILD.replace("from geko_core import SampleTable", "print(geko_core.compiled_core_error() is not None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(tmp_path / "geko_core" / "__init__.py"), "True"]
