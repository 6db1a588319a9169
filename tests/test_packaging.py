"""What `pip install .` brings: every package the default run imports, the files the package data
names, no workflow tool (Snakemake) without the `workflow` extra, and constraints.txt, the tested
versions, covering the whole install."""

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib

import pytest
from workflow_helpers import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _names(requirements: list[str]) -> set[str]:
    return {r.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower() for r in requirements}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


CONSTRAINTS = REPO_ROOT / "constraints.txt"


def _pins() -> dict[str, str]:
    """constraints.txt: canonical name -> exact version (every line NAME==VERSION)."""
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version and not set(version) & set("<>=!~*,;"), f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[_canonical(name)] = version
    return pins


def _installed_closure(requirements: list[str]) -> set[str]:
    """The installed distributions that ``requirements`` pull, transitively (markers evaluated for
    this interpreter, extras followed); a requirement not installed here is left out."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    seen: set[tuple[str, frozenset]] = set()
    stack = [Requirement(r) for r in requirements]
    while stack:
        req = stack.pop()
        key = (_canonical(req.name), frozenset(req.extras))
        if key in seen or req.name == "ncrobust":
            continue
        seen.add(key)
        try:
            requires = importlib.metadata.requires(req.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        extras = sorted(req.extras) or [""]
        for text in requires:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({**default_environment(), "extra": e}) for e in extras):
                stack.append(sub)
    return {name for name, _ in seen}


def test_the_library_alone_does_not_pull_snakemake():
    """`pip install .` (the metrics library) installs no workflow tool: Snakemake and the SLURM
    plugin are the `workflow` extra, and nothing the library depends on pulls them in."""
    dependencies = PYPROJECT["project"]["dependencies"]
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert not {n for n in _names(dependencies) if n.startswith("snakemake")}
    assert {"snakemake", "snakemake-executor-plugin-slurm"} <= _names(extras["workflow"])
    pulled = _installed_closure(dependencies)
    assert "torch" in pulled  # the walk saw the installed dependencies
    assert not {n for n in pulled if n.startswith("snakemake")}, "a library dependency pulls Snakemake"
    # the library itself never imports a workflow tool
    for path in (REPO_ROOT / "src/ncrobust").rglob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+snakemake", path.read_text(), re.MULTILINE), f"{path} imports snakemake"


def test_the_test_extra_brings_the_workflow():
    """The tests start Snakemake: `[test]` includes the workflow extra."""
    assert any(r.replace(" ", "").startswith("ncrobust[workflow") for r in PYPROJECT["project"]["optional-dependencies"]["test"])


def test_constraints_pin_the_tested_torch():
    pins = _pins()
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    assert "ncrobust" not in pins


def test_constraints_satisfy_the_librarys_ranges():
    """The tested versions lie in the ranges pyproject.toml states (a range moved past the tested
    version, or a pin outside a range, fails here rather than in pip's resolver)."""
    from packaging.requirements import Requirement

    pins = _pins()
    extras = PYPROJECT["project"]["optional-dependencies"]
    for text in [*PYPROJECT["project"]["dependencies"], *extras["workflow"], *extras["test"]]:
        req = Requirement(text)
        if req.name == "ncrobust":
            continue
        assert _canonical(req.name) in pins, f"constraints.txt has no pin of {req.name}"
        assert req.specifier.contains(pins[_canonical(req.name)], prereleases=True), (
            f"constraints.txt: {req.name}=={pins[_canonical(req.name)]} is outside pyproject's {text!r}")


def test_constraints_cover_the_whole_install():
    """Every package that `pip install '.[workflow,test]'` installs here has its tested version in
    constraints.txt, so CI and the quick start install exactly that set."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    requirements = [*PYPROJECT["project"]["dependencies"], *extras["workflow"], *(r for r in extras["test"] if not r.startswith("ncrobust"))]
    missing = sorted(_installed_closure(requirements) - set(_pins()))
    assert not missing, f"constraints.txt lacks {', '.join(missing)} (regenerate it: docs/install.md)"


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
