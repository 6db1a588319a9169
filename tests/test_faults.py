"""Faults: killed and preempted jobs, corrupt and untrusted files, divergence, two invocations.
Nothing already computed is lost, nothing is loaded silently."""

import os
import pickle
import random
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from ncrobust.io import CorruptFileError, load_torch, save_torch
from workflow_helpers import REPO_ROOT, SNAKEMAKE, run_snakemake, write_tiny_config

CELL = "results/runs/digits/mlp/ce/pgd-linf/seed1"
# longer training than the tiny default, so that there is time to kill a job mid-segment
LONG = {"training": {"epochs": 200, "checkpoints": [100, 200], "batch_size": 128}}


TARGET = f"{CELL}/metrics/epoch200.parquet"  # the final metrics of one adversarially trained cell


def _metrics(workdir: Path) -> pd.DataFrame:
    return pd.read_parquet(workdir / TARGET)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of the cell."""
    workdir = tmp_path_factory.mktemp("reference")
    config = write_tiny_config(workdir, **LONG)
    run_snakemake(workdir, TARGET, configfile=config)
    return _metrics(workdir)


def _job_pids(workdir: Path, script: str) -> list[int]:
    """PIDs of the Python processes running ``script`` for the workflow in ``workdir``."""
    out = subprocess.run(["pgrep", "-f", f"{workdir}/.snakemake/scripts/.*{script}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _kill_a_training_job(workdir: Path, config: Path, sig: int, delay: float) -> bool:
    """Start the workflow, wait for a training job to be training (its log is open), send it
    ``sig`` after ``delay`` s; True if one was hit."""
    cmd = [SNAKEMAKE, "--snakefile", str(REPO_ROOT / "Snakefile"), "--directory", str(workdir), "--cores", "2", TARGET, "--configfile", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hit = False
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            pids = _job_pids(workdir, "train.py")
            training = [p for p in (workdir / CELL / "logs").glob("train_epoch*.log") if "train " in p.read_text()] if (workdir / CELL / "logs").exists() else []
            if pids and training:
                time.sleep(delay)
                for pid in _job_pids(workdir, "train.py"):
                    os.kill(pid, sig)
                    hit = True
                break
            time.sleep(0.05)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    return hit


def _no_temporary_files(workdir: Path) -> list[Path]:
    return [p for p in (workdir / "results").rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_training_then_rerun_is_bit_identical(tmp_path, reference, sig):
    config = write_tiny_config(tmp_path, **LONG)
    rng = random.Random(sig)
    hits = sum(_kill_a_training_job(tmp_path, config, sig, rng.uniform(0.2, 3.0)) for _ in range(3))
    assert hits >= 1, "no training job was caught running"
    if sig == signal.SIGTERM:
        assert not _no_temporary_files(tmp_path), "a terminated job left a half-written file"
    run_snakemake(tmp_path, TARGET, configfile=config)
    pd.testing.assert_frame_equal(_metrics(tmp_path), reference)


@pytest.mark.slow
def test_sigterm_leaves_no_output_of_the_killed_job(tmp_path):
    """A preempted training job (SIGTERM) exits cleanly with no checkpoint and no temporary file."""
    config = write_tiny_config(tmp_path, **LONG)
    assert _kill_a_training_job(tmp_path, config, signal.SIGTERM, 0.5)
    ckpts = sorted(p.name for p in (tmp_path / CELL / "checkpoints").glob("*.pt")) if (tmp_path / CELL).exists() else []
    logs = list((tmp_path / "results/runs").rglob("train_epoch*.log"))
    assert any("terminated by signal 15" in p.read_text() for p in logs)
    assert not _no_temporary_files(tmp_path)
    for name in ckpts:  # whatever exists is complete and loadable
        load_torch(tmp_path / CELL / "checkpoints" / name)


def test_truncated_and_garbage_files_are_reported_with_path_and_fix(tmp_path):
    good = tmp_path / "epoch2.pt"
    save_torch({"model": {"w": torch.ones(1000)}, "epoch": 2}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path in (truncated, garbage, empty):
        with pytest.raises(CorruptFileError, match=rf"{path}: .*delete it and rerun the workflow"):
            load_torch(path)
    assert load_torch(good)["epoch"] == 2


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ncrobust-pwned",))


def test_checkpoint_with_a_pickled_code_object_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _RunsCode()}, evil)
    marker = Path("/tmp/ncrobust-pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(CorruptFileError, match=r"evil\.pt: refused to load"):
        load_torch(evil)
    assert not marker.exists()
    # and a plain pickle (not a torch zip) is refused too
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(CorruptFileError):
        load_torch(plain)
    assert not marker.exists()


@pytest.mark.slow
def test_corrupt_checkpoint_in_the_workflow_names_the_file(tmp_path):
    config = write_tiny_config(tmp_path)
    run_snakemake(tmp_path, f"{CELL}/checkpoints/epoch2.pt", configfile=config)
    ckpt = tmp_path / CELL / "checkpoints/epoch2.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    proc = run_snakemake(tmp_path, f"{CELL}/checkpoints/epoch4.pt", configfile=config, check=False)
    assert proc.returncode != 0
    assert f"{CELL}/checkpoints/epoch2.pt: unreadable or truncated" in proc.stderr
    assert "delete it and rerun" in proc.stderr
    assert not (tmp_path / CELL / "checkpoints/epoch4.pt").exists()
    # following the advice fixes it
    ckpt.unlink()
    run_snakemake(tmp_path, f"{CELL}/checkpoints/epoch4.pt", configfile=config)


@pytest.mark.slow
def test_divergence_stops_the_job_and_leaves_no_output(tmp_path):
    config = write_tiny_config(tmp_path, training={"epochs": 4, "checkpoints": [2, 4], "optimizer": {"lr": 1.0e30}})
    proc = run_snakemake(tmp_path, f"{CELL}/checkpoints/epoch2.pt", configfile=config, check=False)
    assert proc.returncode != 0
    assert "NonFiniteLossError: non-finite training loss" in proc.stderr
    assert "at epoch 1, step" in proc.stderr and "lr 1e+30" in proc.stderr
    assert not (tmp_path / CELL / "checkpoints/epoch2.pt").exists()
    assert not (tmp_path / CELL / "train_log/epoch2.parquet").exists()
    assert (tmp_path / CELL / "checkpoints/epoch0.pt").exists()  # what was computed before is kept
    assert not _no_temporary_files(tmp_path)


@pytest.mark.slow
def test_a_second_invocation_on_the_same_directory_is_locked_out(tmp_path):
    config = write_tiny_config(tmp_path)
    cmd = [SNAKEMAKE, "--snakefile", str(REPO_ROOT / "Snakefile"), "--directory", str(tmp_path), "--cores", "1", "--configfile", str(config)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list((tmp_path / ".snakemake/locks").glob("*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0
        assert "Directory cannot be locked" in second.stderr + second.stdout
    finally:
        first.wait(timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (tmp_path / "results/tables/metrics.parquet").exists()
