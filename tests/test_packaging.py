"""What `pip install -e .` brings: every package the default run imports, and the files the
package data names."""

import os
import subprocess
import sys
import tomllib

import pytest
from workflow_helpers import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _names(requirements: list[str]) -> set[str]:
    return {r.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower() for r in requirements}


def test_the_default_runs_imports_are_dependencies_not_test_extras():
    """The `robustness` rule of the default run imports torchattacks (APGD-CE, APGD-T)."""
    dependencies = _names(PYPROJECT["project"]["dependencies"])
    assert "torchattacks" in dependencies
    assert not _names(PYPROJECT["project"]["optional-dependencies"]["test"]) & dependencies


def test_package_data_files_exist():
    package_dir = REPO_ROOT / "src"
    for package, patterns in PYPROJECT["tool"]["setuptools"]["package-data"].items():
        for pattern in patterns:
            assert list((package_dir / package).glob(pattern)), f"package-data {package}/{pattern} does not exist"


def test_the_schema_ships_with_the_package_and_the_workflow_links_to_it():
    """A non-editable install has no workflow/ next to the package: the schema the validation
    reads lives in the package, and workflow/schemas/ (where the workflow template keeps schemas)
    points to that one file."""
    import ncrobust
    from ncrobust.config import SCHEMA_PATH, load_schema

    assert SCHEMA_PATH.parent == __import__("pathlib").Path(ncrobust.__file__).resolve().parent
    assert (REPO_ROOT / "workflow/schemas/config.schema.yaml").resolve() == SCHEMA_PATH
    assert "grid" in load_schema()["properties"]


@pytest.mark.workflow
@pytest.mark.parametrize("module", ["ncrobust.tables", "ncrobust.figures.plots", "ncrobust.columns", "ncrobust.findings", "ncrobust.io", "ncrobust.lineage", "ncrobust.runlock", "ncrobust.collect"])
def test_the_tables_and_figures_import_without_torch(module):
    """The tables, the figures and the names the workflow parses with need no torch: importing them
    in a fresh interpreter leaves it unloaded."""
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")},
                            capture_output=True, text=True)
    assert result.returncode == 0, f"importing {module} loads torch, or fails: {result.stderr}"
