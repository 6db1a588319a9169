"""The catalog's front door: the workflow used as a Snakemake module from a directory outside the
repository, as docs/deploy.md (and snakedeploy) sets it up; its format and lint."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from workflow_helpers import REPO_ROOT, SNAKEFILE, SNAKEMAKE, write_tiny_config

DEPLOY_DOC = REPO_ROOT / "docs" / "deploy.md"


def deployed_snakefile(snakefile) -> str:
    """docs/deploy.md's Snakefile, its module pointing at ``snakefile``."""
    block = re.search(r"<!-- deploy:snakefile:start -->\n```snakemake\n(.*?)```\n<!-- deploy:snakefile:end -->",
                      DEPLOY_DOC.read_text(), re.S).group(1)
    placeholder = '"/path/to/ncrobust/workflow/Snakefile"'
    assert placeholder in block
    return block.replace(placeholder, f'"{snakefile}"')


@pytest.mark.workflow
@pytest.mark.slow
def test_deployed_as_a_module_elsewhere_runs_the_tiny_config_end_to_end(tmp_path, finished_tiny_run):
    """snakedeploy's layout (config/ and profiles/ copied, workflow/Snakefile declaring the module)
    in a directory of its own: `snakemake --cores 2` there, as a user types it, runs the whole tiny
    config with the repository's code, the same results as a run in the repository, and the
    module's handlers (the run's lock record: written at the start, removed at the end)."""
    study = tmp_path / "study"
    for name in ("config", "profiles"):  # what snakedeploy copies
        shutil.copytree(REPO_ROOT / name, study / name)
    write_tiny_config(study / "config")
    (study / "workflow").mkdir()
    (study / "workflow" / "Snakefile").write_text(deployed_snakefile(SNAKEFILE))

    proc = subprocess.run([SNAKEMAKE, "--cores", "2"], cwd=study, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "workflow specific profile profiles/default" in proc.stderr  # the copied profile applies
    for name in ("tables/summary.csv", "findings/default.md"):
        assert (study / "results" / name).read_text() == (finished_tiny_run / "results" / name).read_text(), name
    assert (study / "results/report/front_page.html").exists()
    runs = study / ".snakemake/ncrobust/runs"
    assert runs.is_dir() and not list(runs.iterdir())


@pytest.mark.workflow
def test_snakefmt_leaves_the_workflow_unchanged():
    """`snakefmt --check workflow` (the Snakemake catalog's check), with [tool.snakefmt] of pyproject.toml."""
    snakefmt = Path(SNAKEMAKE).with_name("snakefmt")
    proc = subprocess.run([str(snakefmt), "--check", "--compact-diff", "workflow"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.workflow
@pytest.mark.slow
def test_the_only_lint_is_the_one_python_environment(tmp_path):
    """`snakemake --lint` asks each rule for a conda environment or a container, and nothing else:
    every rule runs in the project's one environment (the reason, in workflow/Snakefile). Run from
    another directory with --snakefile, the default profile still applies (workflow/profiles links
    to profiles/)."""
    proc = subprocess.run([SNAKEMAKE, "--lint", "--cores", "1", "--snakefile", str(SNAKEFILE)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert f"workflow specific profile {SNAKEFILE.parent / 'profiles' / 'default'} " in proc.stderr, proc.stderr[-3000:]
    lints = re.findall(r"^    \* (.+?):$", proc.stdout + proc.stderr, re.M)
    assert lints and set(lints) == {"Specify a conda environment or container for each rule."}, proc.stderr[-3000:]
