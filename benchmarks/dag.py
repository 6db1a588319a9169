"""How long Snakemake takes to build the full paper grid's DAG (`snakemake -n`), on this machine.

    .venv/bin/python benchmarks/dag.py            # config/paper.yaml, target: at most 15 s

A temporary empty `data_root` stands in for the pre-staged datasets (the dry run reads none).
Prints the job count and the seconds, best of 3 runs.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from workflow_helpers import stage_placeholders  # noqa: E402


def main() -> None:
    configfile = sys.argv[1] if len(sys.argv) > 1 else "config/paper.yaml"
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    best, jobs = float("inf"), None
    with tempfile.TemporaryDirectory() as tmp:
        stage_placeholders(tmp, "cifar10", "cifar100")  # the config check asks for the staged files; -n reads none
        for _ in range(3):
            cmd = [snakemake, "-n", "--cores", "8", "--configfile", configfile, "--config", f"data_root={tmp}", "--directory", tmp, "--snakefile", str(ROOT / "workflow" / "Snakefile")]
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            elapsed = time.perf_counter() - start
            if proc.returncode != 0:
                sys.exit(f"snakemake -n failed:\n{proc.stderr[-2000:]}")
            jobs = int(re.search(r"^total\s+(\d+)$", proc.stdout, flags=re.M).group(1))
            best = min(best, elapsed)
    print(f"{configfile}: {jobs} jobs, DAG built in {best:.1f} s (best of 3; target <= 15 s)")


if __name__ == "__main__":
    main()
