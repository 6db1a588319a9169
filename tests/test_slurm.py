"""The cluster profile (profiles/slurm) against a real, single-node SLURM started by the test.

Tests marked ``slurm`` start the cluster of ``slurm_cluster.SlurmCluster`` (skipped with the reason
when SLURM/MUNGE are not installed: ``.ci/install_slurm.sh`` installs them). The other tests check
the profile without a cluster: it parses, the ``slurm`` link at the repository root resolves it,
and the workflow hands GPUs to ``train`` and ``evaluate`` only.

The status checks: there is no slurmdbd on the test cluster, so ``sacct`` cannot answer and the
runs pass ``--slurm-status-command squeue`` (the cluster keeps finished jobs visible to squeue
for ``MinJobAge=600`` s); ``--slurm-init-seconds-before-status-checks 4`` only makes them faster: the
plugin checks 4 s after a submission, then 14 s later, then 24 s later (+10 s each time no job
ended); the test's jobs take 8 to 17 s, so most are seen at 18 s (with 5: at 20 s).
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from slurm_cluster import SlurmCluster, unavailable_reason
from workflow_helpers import REPO_ROOT, SNAKEMAKE, cell_dir, run_snakemake, write_tiny_config

PROFILE = REPO_ROOT / "profiles" / "slurm"
# Rules that must ask for a GPU and rules that must not (others, e.g. a GPU-side attack rule,
# may do either, but consistently with the config).
GPU_RULES = {"train", "evaluate"}
CPU_RULES = {"prepare_data", "aggregate", "figures"}

# Small requests that fit any test machine: the node is the machine itself plus one fake GPU.
TEST_RESOURCES = {
    "train": {"gpu": 1, "cpus": 1, "mem_mb": 1000, "runtime": 10},
    "evaluate": {"gpu": 1, "cpus": 1, "mem_mb": 1000, "runtime": 10},
    "cpu": {"cpus": 1, "mem_mb": 1000, "runtime": 10},
    "gpu_model": None,
}
# One cell, two training segments (epochs 0 -> 2 -> 4), evaluated at epochs 0 and 4: the
# shortest chain that has a resume point between two segments. Every SLURM job costs two
# Snakemake start-ups on top of its work, so the grid is kept to the minimum.
CELL = cell_dir(adversary="pgd-linf")
SLURM_TINY = {
    "grid": {"dataset": ["digits"], "model": ["mlp"], "loss": ["ce"], "adversary": ["pgd-linf"], "seed": [1]},
    "training": {"epochs": 4, "checkpoints": [2, 4], "batch_size": 128},
    "evaluation": {
        "splits": ["train", "test"],
        "perturbations": {"clean": {}, "pgd": {}},
        "epochs": [4],
        "batch_size": 500,
        "strong": {"attacks": [], "max_samples": 40},  # the robustness rule runs, PGD-10 on 40 images
    },
    "resources": TEST_RESOURCES,
}
TABLES = ("metrics.parquet", "training.parquet", "summary.parquet", "summary.md", "summary.csv")


# ----------------------------------------------------------------------------- helpers
def rule_of(job: dict[str, str]) -> str:
    """The Snakemake rule of a SLURM job, from the comment the plugin gives it:
    ``rule_<name>`` or ``rule_<name>_wildcards_<values>`` (``group_...`` for job groups)."""
    comment = job.get("Comment", "")
    return comment.removeprefix("rule_").split("_wildcards_")[0]


def snakemake_on_slurm(workdir: Path, configfile: Path, *extra: str) -> list[str]:
    """The user's command (`snakemake --cores 8 --profile slurm`) plus what the test cluster needs."""
    return [
        SNAKEMAKE, "--profile", str(PROFILE),
        "--snakefile", str(REPO_ROOT / "workflow" / "Snakefile"), "--directory", str(workdir),
        "--configfile", str(configfile), "--cores", "8",
        "--default-resources", f"slurm_partition={SlurmCluster.partition}", "slurm_account=ncrobust",
        "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "4",
        "--slurm-keep-successful-logs",
        *extra,
    ]


def wait_for_job(cluster: SlurmCluster, proc: subprocess.Popen, match, timeout: float = 600,
                 log: Path | None = None) -> dict[str, str]:
    """Poll the controller until a job for which ``match(job)`` holds is RUNNING; when Snakemake
    ends first, the message holds the end of its output (``log``) and the cluster's jobs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = log.read_text()[-6000:] if log is not None and log.exists() else ""
            if log is not None:  # the jobs' own logs (kept: --slurm-keep-successful-logs)
                for job_log in sorted(log.parent.glob("*/.snakemake/slurm_logs/*/*/*.log")):
                    output += f"\n--- {job_log.name}:\n{job_log.read_text()[-2000:]}"
            raise AssertionError(f"snakemake ended ({proc.returncode}) before the awaited job ran:\n{output}\n"
                                 f"jobs: {cluster.jobs()}")
        for job in cluster.jobs():
            if job.get("JobState") == "RUNNING" and match(job):
                return job
        time.sleep(0.3)
    raise AssertionError(f"no matching job ran within {timeout} s:\n{cluster.logs()}")


def job_state(cluster: SlurmCluster, job_id: str) -> str:
    return next(j["JobState"] for j in cluster.jobs() if j["JobId"] == job_id)


def sorted_frame(path: Path) -> pd.DataFrame:
    df = pd.read_parquet(path)
    return df.sort_values(list(df.columns)).reset_index(drop=True)


@pytest.fixture(scope="module")
def cluster():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with SlurmCluster() as c:
        yield c


# ---------------------------------------------------------------- without a cluster
def test_slurm_link_points_to_the_profile():
    link = REPO_ROOT / "slurm"
    assert link.is_symlink() and link.resolve() == PROFILE.resolve()


@pytest.mark.workflow
@pytest.mark.slow
def test_profile_resolves_from_repository_root(tmp_path):
    """`snakemake --cores 8 --profile slurm -n` from the root: the link finds the profile; a dry
    run needs no sbatch (it runs on machines without SLURM, too). The workflow runs in an empty
    directory (`--directory`), so that a finished `results/` in the checkout changes nothing."""
    proc = subprocess.run([SNAKEMAKE, "--cores", "8", "--profile", "slurm", "-n", "--directory", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "slurm_partition=" in out and "slurm_account=" in out  # the profile's default-resources
    assert "This was a dry-run" in out


@pytest.mark.workflow
@pytest.mark.slow
def test_gpu_requests_go_to_train_and_evaluate_only(tmp_path):
    """The resources every rule hands to the plugin (dry run): a GPU as the string `gres` (with
    gpu_model) for train and evaluate, none elsewhere; CPUs, memory and runtime from the config."""
    resources = dict(TEST_RESOURCES, gpu_model="a100")
    config = write_tiny_config(tmp_path, **dict(SLURM_TINY, resources=resources))
    proc = subprocess.run([SNAKEMAKE, "--profile", str(PROFILE), "--snakefile", str(REPO_ROOT / "workflow" / "Snakefile"),
                           "--directory", str(tmp_path), "--configfile", str(config), "--cores", "8", "-n"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = {}
    rule = None
    for line in (proc.stdout + proc.stderr).splitlines():
        line = line.strip()
        if line.startswith("rule ") and line.endswith(":"):
            rule = line[5:-1]
        elif line.startswith("resources:") and rule and rule != "all":
            items = (item.strip().split("=", 1) for item in line[len("resources:"):].split(", ") if "=" in item)
            seen.setdefault(rule, []).append(dict(items))
    assert GPU_RULES | CPU_RULES <= set(seen)
    for rule, jobs in seen.items():
        for res in jobs:
            assert res.get("runtime") == "10" and res.get("mem_mb") == "1000" and res.get("cpus_per_task") == "1", (rule, res)
            assert "gpu" not in res and "gpu_model" not in res, (rule, res)  # numbers a job group would sum
            if rule in GPU_RULES or (rule not in CPU_RULES and "gres" in res):
                assert res.get("gres") == "gpu:a100:1", (rule, res)
            else:
                assert "gres" not in res, (rule, res)


# -------------------------------------------------------------------- on the cluster
TOY_SNAKEFILE = """
rule all:
    input: "cpu.txt"

rule on_gpu:
    output: "gpu.txt"
    resources: gpu=1, cpus_per_task=1, mem_mb=200, runtime=5
    shell: "echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES > {output}"

rule on_cpu:
    input: "gpu.txt"
    output: "cpu.txt"
    resources: cpus_per_task=1, mem_mb=200, runtime=5
    shell: "cat {input} > {output}; echo CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-}} >> {output}"
"""


@pytest.mark.slurm
def test_toy_workflow_gpu_request(cluster, tmp_path):
    """Two rules through the profile: `gpu=1` becomes `--gpus=1` (the job gets the node's GPU),
    a rule without it asks for none."""
    (tmp_path / "Snakefile").write_text(TOY_SNAKEFILE)
    cmd = [SNAKEMAKE, "--profile", str(PROFILE), "--directory", str(tmp_path), "--cores", "8",
           # its jobs end within about 3 s of their submission: seen at the first check (with 2: at 14 s)
           "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "5",
           "--slurm-keep-successful-logs"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cluster.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:] + cluster.logs()
    assert (tmp_path / "cpu.txt").read_text().splitlines() == ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES="]
    jobs = {rule_of(j): j for j in cluster.jobs() if j.get("WorkDir") == str(tmp_path)}
    assert set(jobs) == {"on_gpu", "on_cpu"}
    assert jobs["on_gpu"]["TresPerJob"] == "gres:gpu:1" and cluster.requests_gpu(jobs["on_gpu"])
    assert not cluster.requests_gpu(jobs["on_cpu"])
    assert all(j["JobState"] == "COMPLETED" and j["Partition"] == cluster.partition for j in jobs.values())
    # SLURM's log of each job: .snakemake/slurm_logs/rule_<name>/[<wildcards>/]<jobid>.log
    # (kept for successful jobs only with --slurm-keep-successful-logs).
    for rule, job in jobs.items():
        assert (tmp_path / ".snakemake/slurm_logs" / f"rule_{rule}" / f"{job['JobId']}.log").is_file()


@pytest.mark.slurm
def test_packed_training_chains_share_one_gpu(cluster, tmp_path):
    """`group_training: true` with `--group-components train=2`: the training chains of two cells
    go to SLURM as one job holding one GPU (`gres`, a string Snakemake does not sum over a
    group's parallel jobs) and the CPUs and memory of both, and both chains finish in it. With
    `mps: true` each training job looks for its allocation's MPS daemon: this cluster has no GPU
    and no MPS, so each says so in its log and trains without it."""
    tiny = dict(SLURM_TINY, grid={**SLURM_TINY["grid"], "adversary": ["st", "pgd-linf"]}, group_training=True,
                mps=True, device="auto")
    tiny["training"] = {**tiny["training"], "epochs": 2, "checkpoints": [2]}
    tiny["evaluation"] = {**tiny["evaluation"], "epochs": [2]}
    config = write_tiny_config(tmp_path, **tiny)
    # the data and the initial checkpoints locally: only the training goes through SLURM
    run_snakemake(tmp_path, *(f"{cell_dir(adversary=a)}/checkpoints/epoch0.pt" for a in ("st", "pgd-linf")), configfile=config)
    targets = [f"{cell_dir(adversary=a)}/checkpoints/epoch2.pt" for a in ("st", "pgd-linf")]
    proc = subprocess.run(snakemake_on_slurm(tmp_path, config, *targets, "--group-components", "train=2"),
                          env=cluster.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:] + cluster.logs()
    assert all((tmp_path / t).is_file() for t in targets)
    packed = [j for j in cluster.jobs() if j.get("WorkDir") == str(tmp_path) and cluster.requests_gpu(j)]
    assert len(packed) == 1, packed  # the segments of 2 cells: one allocation
    job = packed[0]
    assert cluster.gpu_count(job) == 1 and job["NumCPUs"] == "2", job
    assert job["JobState"] == "COMPLETED", job
    for adversary in ("st", "pgd-linf"):
        log = (tmp_path / cell_dir(adversary=adversary) / "logs/train_epoch2.log").read_text()
        assert "mps: nvidia-cuda-mps-control not found on PATH" in log and "training without it" in log, log


@pytest.mark.slurm
@pytest.mark.slow
def test_workflow_on_slurm_survives_preemption_and_cancellation(cluster, tmp_path):
    """The tiny workflow through `--profile slurm` on the cluster, with two interruptions:

    0. the data and the initial checkpoint are made locally first (as in the packed test: every
       SLURM job here costs a status-check wait of about 18 s, and these two are tested there and
       in the dry run of `test_gpu_requests_go_to_train_and_evaluate_only`);
    1. the first training segment is requeued while it runs (what preemption does with
       `slurm-requeue`): SLURM runs the same job again and Snakemake, still waiting, goes on;
    2. the second training segment is cancelled (`scancel`) while it runs: the profile's
       `retries: 1` submits it again, and it trains from the first segment's checkpoint.

    The run then finishes, a second run finds nothing to do, and the cell's metrics are identical
    to those of an uninterrupted local run (CPU: same bits; the local run makes only that file,
    the tables of one cell are made from it).
    """
    ref_dir, run_dir = tmp_path / "local", tmp_path / "slurm"
    ref_config = write_tiny_config(ref_dir, **SLURM_TINY)
    config = write_tiny_config(run_dir, **SLURM_TINY)

    # The uninterrupted reference, locally, while the cluster run waits on its jobs.
    metrics = f"{CELL}/metrics/epoch4.parquet"
    reference: dict = {}
    local = threading.Thread(target=lambda: reference.update(proc=run_snakemake(ref_dir, metrics, configfile=ref_config, check=False)))
    local.start()

    def in_run(job):
        return job.get("WorkDir") == str(run_dir)

    def train_segment(epoch):
        return lambda job: in_run(job) and rule_of(job) == "train" and job["Comment"].endswith(f"_{epoch}")

    run_snakemake(run_dir, f"{CELL}/checkpoints/epoch0.pt", configfile=config)
    run_log = tmp_path / "run.log"
    log = open(run_log, "w")
    run = subprocess.Popen(snakemake_on_slurm(run_dir, config), env=cluster.env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        # 1. Preemption: requeue the running first segment, and let it start again at once
        #    (SLURM holds a requeued job back for two minutes by default).
        seg1 = wait_for_job(cluster, run, train_segment(2), log=run_log)
        cluster.run("scontrol", "requeue", seg1["JobId"])
        deadline = time.monotonic() + 60
        while job_state(cluster, seg1["JobId"]) != "PENDING" and time.monotonic() < deadline:
            time.sleep(0.2)
        cluster.run("scontrol", "update", f"JobId={seg1['JobId']}", "StartTime=now")
        # 2. Cancellation: scancel the running second segment; Snakemake submits it again.
        seg2 = wait_for_job(cluster, run, train_segment(4), log=run_log)
        cluster.run("scancel", seg2["JobId"])
        run.wait(timeout=900)
    finally:
        if run.poll() is None:
            run.kill()
        log.close()
    assert run.returncode == 0, run_log.read_text()[-6000:] + cluster.logs()
    seg1_jobs = {j["JobId"]: j for j in cluster.jobs() if train_segment(2)(j)}
    requeued = seg1_jobs.pop(seg1["JobId"])
    assert requeued["JobState"] == "COMPLETED" and int(requeued.get("Restarts", "0")) >= 1  # ran again, to the end
    # Requeued, not submitted again, unless Snakemake reported a failure of the segment's job first (the
    # profile's `retries: 1` then submits it once more; seen once on a loaded CI machine): a resubmission
    # without a reported failure would be two jobs writing one checkpoint.
    failures = re.findall(r"SLURM-job '(\d+)' failed[^\n]*", run_log.read_text())
    assert not seg1_jobs or (len(seg1_jobs) == 1 and seg1["JobId"] in failures), (
        f"segment 2 submitted again without a reported failure: {sorted(seg1_jobs)}; failures: {failures}\n"
        + run_log.read_text()[-6000:]
    )
    seg2_states = {j["JobId"]: j["JobState"] for j in cluster.jobs() if train_segment(4)(j)}
    assert seg2_states.pop(seg2["JobId"]) == "CANCELLED" and list(seg2_states.values()) == ["COMPLETED"]

    # Every output of `rule all` is there: a dry run finds nothing to do.
    dry = subprocess.run(snakemake_on_slurm(run_dir, config, "-n"), env=cluster.env, capture_output=True, text=True)
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]
    for name in TABLES:
        assert (run_dir / "results/tables" / name).stat().st_size > 0
    assert list((run_dir / "results/figures").glob("*.png"))

    # GPUs for train and evaluate, none for the rest; every job in the partition and account;
    # the front page (a local rule) and the jobs made locally before the first run not on SLURM.
    jobs = [j for j in cluster.jobs() if in_run(j)]
    rules = {rule_of(j) for j in jobs}
    assert GPU_RULES | CPU_RULES - {"prepare_data"} <= rules
    assert not rules & {"report_page", "prepare_data", "init_model"}
    for job in jobs:
        if rule_of(job) in GPU_RULES:
            assert cluster.gpu_count(job) == 1, job
        elif rule_of(job) in CPU_RULES:
            assert not cluster.requests_gpu(job), job
        assert job["Partition"] == cluster.partition and job["Account"] == "ncrobust"

    local.join(timeout=900)
    ref = reference["proc"]
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    pd.testing.assert_frame_equal(sorted_frame(run_dir / metrics), sorted_frame(ref_dir / metrics), check_exact=True)
    # the table is that file (one cell, one evaluated epoch)
    pd.testing.assert_frame_equal(
        sorted_frame(run_dir / "results/tables/metrics.parquet"), sorted_frame(run_dir / metrics), check_exact=True
    )


if __name__ == "__main__":  # pragma: no cover - a manual check: python tests/test_slurm.py
    sys.exit(pytest.main([__file__, "-v", "-rs"]))
