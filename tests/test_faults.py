"""Faults: killed and preempted jobs, corrupt and untrusted files, divergence, two invocations.
Nothing already computed is lost, nothing is loaded silently."""

import contextlib
import errno
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from workflow_helpers import REPO_ROOT, cell_dir, copy_run, run_snakemake, snakemake_command, write_tiny_config

from ncrobust.io import CorruptFileError, DiskFullError, job_log, load_torch, read_parquet, save_torch, write_parquet

CELL = cell_dir(adversary="pgd-linf")
# longer training than the tiny default, so that there is time to kill a job mid-segment
LONG = {"training": {"epochs": 200, "checkpoints": [100, 200], "batch_size": 128}}


TARGET = f"{CELL}/metrics/epoch200.parquet"  # the final metrics of one adversarially trained cell


def _metrics(workdir: Path) -> pd.DataFrame:
    return pd.read_parquet(workdir / TARGET)


@dataclass
class Reference:
    workdir: Path  # the finished run of TARGET with the LONG config
    metrics: pd.DataFrame  # its TARGET
    second: subprocess.CompletedProcess  # the same command, started on the same directory while it ran


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    """The uninterrupted run of the cell (serial jobs, --cores 1: the lock is held a while), and a
    second invocation of the same command on the same directory while it runs."""
    workdir = tmp_path_factory.mktemp("reference")
    config = write_tiny_config(workdir, **LONG)
    cmd = snakemake_command(workdir, TARGET, configfile=config)
    with open(workdir.parent / f"{workdir.name}.log", "w+") as log:
        first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 60
            while not list((workdir / ".snakemake/locks").glob("*")) and time.monotonic() < deadline:
                time.sleep(0.1)
            second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        finally:
            first.wait(timeout=600)
        log.seek(0)
        assert first.returncode == 0, log.read()[-3000:]
    return Reference(workdir, _metrics(workdir), second)


# what the reference run had made before its last training segment (epoch 100 -> 200)
BEFORE_LAST_SEGMENT = ("checkpoints/epoch0.pt", "logs/init.log", "checkpoints/epoch100.pt", "train_log/epoch100.parquet")


def _before_last_segment(reference: Reference, tmp_path: Path) -> Path:
    """A copy of the reference run as it was before its last training segment: the tests that
    kill training start it at once, and it resumes from a checkpoint (epoch 100, with its
    optimizer state) as a preempted job's rerun does."""
    workdir = copy_run(reference.workdir, tmp_path / "run")
    for path in (workdir / CELL).rglob("*"):
        if path.is_file() and path.relative_to(workdir / CELL).as_posix() not in BEFORE_LAST_SEGMENT:
            path.unlink()
    return workdir


def _job_pids(workdir: Path, script: str) -> list[int]:
    """PIDs of the Python processes running ``script`` for the workflow in ``workdir``."""
    out = subprocess.run(["pgrep", "-f", f"{workdir}/.snakemake/scripts/.*{script}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _kill_a_training_job(workdir: Path, config: Path, sig: int, delay: float) -> bool:
    """Start the workflow, wait for a training job to be training (its log is open), send it
    ``sig`` after ``delay`` s; True if one was hit."""
    proc = subprocess.Popen(snakemake_command(workdir, TARGET, configfile=config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def _assert_terminated_cleanly(workdir: Path) -> None:
    """What a preempted training job (SIGTERM) leaves: a log that says so, no temporary file, and
    only complete, loadable checkpoints."""
    logs = list((workdir / "results/runs").rglob("train_epoch*.log"))
    assert any("terminated by signal 15" in p.read_text() for p in logs), "the terminated job's log does not say so"
    assert not _no_temporary_files(workdir), "a terminated job left a half-written file"
    for path in (workdir / CELL / "checkpoints").glob("*.pt"):  # whatever exists is complete and loadable
        load_torch(path)


@pytest.mark.workflow
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_training_then_rerun_is_bit_identical(tmp_path, reference, sig):
    """A training job killed three times (0.5 s into training, then at random moments), then the
    same command: the result is bit-identical to the uninterrupted run. With SIGTERM (a preempted
    job), right after the first kill: the job exited cleanly (its log says so), with no temporary
    file and no incomplete checkpoint, and after the last kill no temporary file either."""
    workdir = _before_last_segment(reference, tmp_path)
    config = workdir / "config.yaml"
    assert _kill_a_training_job(workdir, config, sig, 0.5), "no training job was caught running"
    if sig == signal.SIGTERM:
        _assert_terminated_cleanly(workdir)
    rng = random.Random(sig)
    for _ in range(2):
        _kill_a_training_job(workdir, config, sig, rng.uniform(0.2, 3.0))
    if sig == signal.SIGTERM:
        assert not _no_temporary_files(workdir), "a terminated job left a half-written file"
    run_snakemake(workdir, TARGET, configfile=config)
    pd.testing.assert_frame_equal(_metrics(workdir), reference.metrics)


def _corrupt_copies(tmp_path: Path, good: Path) -> list[Path]:
    """The ways a checkpoint gets damaged: cut short, overwritten by text or random bytes, emptied,
    bytes zeroed inside the archive."""
    data = good.read_bytes()
    damaged = {
        "truncated.pt": data[: len(data) // 2],
        "text.pt": b"garbage\n",
        "random.pt": os.urandom(4096),
        "empty.pt": b"",
        "zeroed.pt": data[:200] + bytes(100) + data[300:],
        "tail_cut.pt": data[:-10],
    }
    paths = []
    for name, content in damaged.items():
        (tmp_path / name).write_bytes(content)
        paths.append(tmp_path / name)
    return paths


def test_corrupt_files_are_reported_as_corrupt_with_path_and_fix(tmp_path):
    """Each damage is one line: the path, 'unreadable or corrupt' (never 'objects other than
    tensors'), the rm command; never torch's advice to load with weights_only=False."""
    good = tmp_path / "epoch2.pt"
    save_torch({"model": {"w": torch.ones(1000)}, "epoch": 2}, good)
    for path in _corrupt_copies(tmp_path, good):
        with pytest.raises(CorruptFileError) as info:
            load_torch(path)
        message = str(info.value)
        assert message.startswith(f"{path}: unreadable or corrupt"), message
        assert f"rebuild it alone (rm '{path}' && snakemake --cores 1 '{path}'), then rerun the same snakemake command" in message
        assert "\n" not in message and "weights_only" not in message and "other than tensors" not in message
        assert info.value.__cause__ is None and info.value.__context__ is None  # torch's hint is not chained either
    assert load_torch(good)["epoch"] == 2


def test_corrupt_parquet_is_reported_with_path_and_fix(tmp_path):
    path = tmp_path / "epoch2.parquet"
    write_parquet(pd.DataFrame({"a": [1.0, 2.0]}), path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CorruptFileError, match=rf"^{path}: unreadable or corrupt Parquet file .*rm '{path}'"):
        read_parquet(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_parquet(tmp_path / "missing.parquet")


def test_a_corrupt_file_in_a_job_is_one_line_on_stderr(tmp_path, capsys):
    """In a job, the report is one line on stderr (no traceback there; the log has it) and the job
    exits with status 1."""
    bad = tmp_path / "epoch6.pt"
    bad.write_bytes(b"garbage")
    log = tmp_path / "job.log"
    with pytest.raises(SystemExit) as info:
        with job_log(log):
            load_torch(bad)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ncrobust: CorruptFileError: {bad}: unreadable or corrupt")
    assert "Traceback" in log.read_text() and "Traceback" not in err


@pytest.mark.parametrize("fails", ["missing dataset", "too few samples"])
def test_an_explained_data_error_in_a_job_is_one_line_on_stderr(tmp_path, capsys, fails):
    """A dataset that is missing (a data_root emptied after the config check) or too small for the
    asked subset: one line on stderr naming the fix, the traceback in the log only."""
    from ncrobust import data

    log = tmp_path / "job.log"
    with pytest.raises(SystemExit) as info:
        with job_log(log):
            if fails == "missing dataset":
                data.load("cifar10", root=tmp_path)
            else:
                data.load("digits", train_per_class=10_000)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("lacks data_batch_1" in err if fails == "missing dataset" else "to at most" in err), err
    assert "Traceback" in log.read_text() and "Traceback" not in err


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ncrobust-pwned",))


def test_checkpoint_with_a_pickled_code_object_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _RunsCode()}, evil)
    marker = Path("/tmp/ncrobust-pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(CorruptFileError, match=r"evil\.pt: refused: it holds pickled objects other than tensors") as info:
        load_torch(evil)
    assert "weights_only" not in str(info.value)
    assert not marker.exists()
    # and a plain pickle (not a torch zip) is refused too
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(CorruptFileError):
        load_torch(plain)
    assert not marker.exists()


@pytest.mark.slow
def test_corrupt_checkpoint_in_the_workflow_names_the_file(tmp_path, finished_tiny_run):
    """A corrupt checkpoint as the input of the next training segment (a copy of the finished run
    without that segment's outputs): the job fails naming the file and the rm that fixes it,
    writes nothing, and following the advice fixes it."""
    workdir = copy_run(finished_tiny_run, tmp_path / "run")
    config = workdir / "config.yaml"
    for name in ("checkpoints/epoch4.pt", "train_log/epoch4.parquet"):
        (workdir / CELL / name).unlink()
    ckpt = workdir / CELL / "checkpoints/epoch2.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    proc = run_snakemake(workdir, f"{CELL}/checkpoints/epoch4.pt", configfile=config, check=False)
    assert proc.returncode != 0
    assert f"{CELL}/checkpoints/epoch2.pt: unreadable or corrupt" in proc.stderr
    assert f"rebuild it alone (rm '{CELL}/checkpoints/epoch2.pt' && snakemake --cores 1 '{CELL}/checkpoints/epoch2.pt')" in proc.stderr
    assert not (workdir / CELL / "checkpoints/epoch4.pt").exists()
    # following the advice fixes it
    ckpt.unlink()
    run_snakemake(workdir, f"{CELL}/checkpoints/epoch2.pt", configfile=config)
    run_snakemake(workdir, f"{CELL}/checkpoints/epoch4.pt", configfile=config)


@pytest.mark.slow
def test_divergence_stops_the_job_and_leaves_no_output(tmp_path, finished_tiny_run):
    """A diverging training segment (lr 1e30; a copy of the finished run without the segment's
    outputs) stops with the epoch, step and lr, writes nothing and keeps what was there."""
    workdir = copy_run(finished_tiny_run, tmp_path / "run")
    for name in ("checkpoints/epoch2.pt", "train_log/epoch2.parquet"):
        (workdir / CELL / name).unlink()
    config = write_tiny_config(workdir, training={"epochs": 4, "checkpoints": [2, 4], "optimizer": {"lr": 1.0e30}})
    proc = run_snakemake(workdir, f"{CELL}/checkpoints/epoch2.pt", configfile=config, check=False)
    assert proc.returncode != 0
    assert "NonFiniteLossError: non-finite training loss" in proc.stderr
    assert "at epoch 1, step" in proc.stderr and "lr 1e+30" in proc.stderr
    assert not (workdir / CELL / "checkpoints/epoch2.pt").exists()
    assert not (workdir / CELL / "train_log/epoch2.parquet").exists()
    assert (workdir / CELL / "checkpoints/epoch0.pt").exists()  # what was computed before is kept
    assert not _no_temporary_files(workdir)


@pytest.mark.workflow
@pytest.mark.slow
def test_a_second_invocation_on_the_same_directory_is_locked_out(reference):
    """The reference fixture starts the same command a second time while the first one runs: the
    second is refused, and the first finishes undisturbed."""
    second = reference.second
    assert second.returncode != 0
    assert "another Snakemake run holds a lock on files this run would write" in second.stderr
    assert (reference.workdir / TARGET).exists()


# ------------------------------------------------------------------ permissions and a full disk
@pytest.fixture
def umask():
    """Set the process umask for one test (files a job writes inherit it), restore it after."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def _write_each_kind(directory: Path) -> list[Path]:
    """One file of each kind the workflow writes: checkpoint, Parquet, text, figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ncrobust.io import atomic_path, write_text

    files = [directory / "epoch2.pt", directory / "metrics.parquet", directory / "summary.md", directory / "figure.png"]
    save_torch({"w": torch.ones(3)}, files[0])
    write_parquet(pd.DataFrame({"a": [1]}), files[1])
    write_text("| a |\n", files[2])
    fig = plt.figure()
    with atomic_path(files[3]) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return files


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_are_readable_as_the_umask_allows(tmp_path, umask, mask, mode):
    umask(mask)
    for path in _write_each_kind(tmp_path / "results"):
        assert path.stat().st_mode & 0o777 == mode, f"{path.name}: {oct(path.stat().st_mode & 0o777)}"
    assert not list((tmp_path / "results").glob(".*.tmp"))


DISK_FULL_ERRORS = {
    "torch": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
    "python": OSError(errno.ENOSPC, "No space left on device"),
    "quota": OSError(errno.EDQUOT, "Disk quota exceeded"),
}


@pytest.mark.parametrize("kind", DISK_FULL_ERRORS)
def test_a_full_disk_is_named_with_the_path(tmp_path, monkeypatch, kind):
    """Whatever the writer's error (torch's zip writer loses the errno), the message says disk full,
    names the file, and no temporary file remains."""
    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")  # save_torch hands torch an open file
        raise DISK_FULL_ERRORS[kind]

    monkeypatch.setattr(torch, "save", full_disk)
    target = tmp_path / "checkpoints" / "epoch12.pt"
    with pytest.raises(DiskFullError, match=rf"^{target}: could not be written: no space left on the device \(disk full or quota exceeded") as info:
        save_torch({"w": torch.ones(3)}, target)
    assert info.value.errno == errno.ENOSPC and "\n" not in str(info.value)
    assert not target.exists() and not list(target.parent.iterdir())


def test_other_write_errors_are_not_called_disk_full(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", lambda obj, f: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied")))
    with pytest.raises(PermissionError):
        save_torch({}, tmp_path / "x.pt")


@contextlib.contextmanager
def _read_only(directory: Path):
    """``directory`` unwritable while in the block: mode 555 for a user, an empty read-only tmpfs
    over it for root (whom modes do not stop); skips the test where neither works."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)
        return
    if not shutil.which("mount") or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(directory)],
                                                   capture_output=True).returncode != 0:
        pytest.skip("cannot make a directory read-only here (root without mount)")
    try:
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True)


@pytest.mark.workflow
@pytest.mark.slow
def test_an_unwritable_cell_directory_stops_the_run_in_one_line_before_any_job(tmp_path, finished_tiny_run):
    """A cell's directory that cannot be written (a read-only mount, another group's directory):
    one line naming it and the fix, no job started, and after the fix the same command finishes."""
    workdir = copy_run(finished_tiny_run, tmp_path / "run")
    cell = cell_dir(dataset="digits", adversary="st")
    (workdir / cell / "metrics/epoch4.parquet").unlink()
    config = workdir / "config.yaml"
    with _read_only(workdir / cell / "logs"):
        proc = run_snakemake(workdir, configfile=config, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ncrobust:")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    assert f"cannot write into {workdir / cell / 'logs'} " in lines[0] and "chmod -R u+w" in lines[0]
    assert "Traceback" not in proc.stderr and "Error in rule" not in proc.stderr + proc.stdout
    assert not list((workdir / ".snakemake/locks").glob("*"))  # the lock is released
    run_snakemake(workdir, configfile=config)
    assert (workdir / cell / "metrics/epoch4.parquet").exists()


def _small_tmpfs(where: Path) -> bool:
    where.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True).returncode == 0


@pytest.mark.workflow
def test_a_really_full_disk_is_named_with_the_path(tmp_path):
    """The same on a real 64 KiB file system, for torch, Parquet and text (skipped unless root can
    mount a tmpfs)."""
    from ncrobust.io import write_text

    disk = tmp_path / "small"
    if not _small_tmpfs(disk):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        writers = {
            "epoch2.pt": lambda p: save_torch({"w": torch.randn(100_000)}, p),
            "metrics.parquet": lambda p: write_parquet(pd.DataFrame({"a": torch.randn(100_000).numpy()}), p),
            "summary.md": lambda p: write_text("x" * 1_000_000, p),
        }
        for name, write in writers.items():
            with pytest.raises(DiskFullError, match=rf"^{disk / name}: could not be written: no space left"):
                write(disk / name)
        assert not list(disk.iterdir()), "a half-written file was left"
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ------------------------------------------------------------------ Ctrl-C, and the default profile
def test_default_profile_makes_the_same_command_resume_and_suits_slurm():
    """profiles/default/ is applied to every run, `--profile slurm` included (its keys override the
    SLURM profile's one by one): only settings that are right everywhere."""
    import yaml

    default = yaml.safe_load((REPO_ROOT / "profiles/default/config.yaml").read_text())
    slurm = yaml.safe_load((REPO_ROOT / "profiles/slurm/config.yaml").read_text())
    assert default["rerun-incomplete"] is True
    assert not {"executor", "jobs", "cores", "default-resources", "set-resources", "retries", "keep-going"} & set(default)
    assert all(slurm[key] == value for key, value in default.items() if key in slurm)


def _interrupt_while_training(workdir: Path, config: Path, how: str, *extra: str) -> None:
    """Start the workflow like a user in a terminal and, while a training job runs, either press
    Ctrl-C (``"ctrl-c"``: SIGINT to the whole process group) or kill Snakemake alone
    (``"kill-snakemake"``: SIGKILL; a closed terminal, the OOM killer), whose running job then
    finishes its outputs with Snakemake's "incomplete" mark still on them."""
    cmd = snakemake_command(workdir, *extra, TARGET, configfile=config)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        logs = workdir / CELL / "logs"
        while time.monotonic() < deadline and proc.poll() is None:
            if _job_pids(workdir, "train.py") and any("train " in p.read_text() for p in logs.glob("train_epoch*.log")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the workflow ended before a training job ran"
        time.sleep(0.5)
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=300)
        else:
            jobs = _job_pids(workdir, "train.py")
            proc.kill()
            proc.wait()
            while any(Path(f"/proc/{pid}").exists() for pid in jobs):  # the orphaned job finishes
                time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.workflow
@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "kill-snakemake"])
def test_interrupted_then_the_same_command_resumes(tmp_path, reference, how):
    """The same command goes on (the default profile's rerun-incomplete), and the result is that
    of an uninterrupted run."""
    workdir = _before_last_segment(reference, tmp_path)
    config = workdir / "config.yaml"
    _interrupt_while_training(workdir, config, how)
    if how == "kill-snakemake":  # a killed Snakemake leaves its lock, and the record that it held it
        assert list((workdir / ".snakemake/locks").glob("*.lock"))
    proc = run_snakemake(workdir, TARGET, configfile=config, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "IncompleteFilesException" not in proc.stderr
    assert ("removed the lock left by a killed run" in proc.stderr) == (how == "kill-snakemake")
    assert not list((workdir / ".snakemake/ncrobust/runs").glob("*"))  # the resumed run ended: no record
    pd.testing.assert_frame_equal(_metrics(workdir), reference.metrics)


@pytest.mark.workflow
@pytest.mark.slow
def test_a_lock_no_recorded_run_holds_is_one_line_whose_advice_resumes(tmp_path, reference):
    """A lock that no run of this workflow is recorded to hold (a run on another machine, or killed
    before it could say so) is not removed: the run stops with one line naming ``--unlock`` and
    when it is safe; following it resumes with the uninterrupted run's result."""
    workdir = _before_last_segment(reference, tmp_path)
    config = workdir / "config.yaml"
    _interrupt_while_training(workdir, config, "kill-snakemake")
    shutil.rmtree(workdir / ".snakemake/ncrobust/runs")
    proc = run_snakemake(workdir, TARGET, configfile=config, check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ncrobust:")]
    assert len(lines) == 1 and "`snakemake --unlock` followed by the same command" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    run_snakemake(workdir, "--unlock", configfile=config)
    run_snakemake(workdir, TARGET, configfile=config)
    pd.testing.assert_frame_equal(_metrics(workdir), reference.metrics)


# ------------------------------------------------------------------ recovering from a corrupt file
ST_CELL = cell_dir(adversary="st")
TIMING_COLUMNS = ["seconds"]  # wall-clock time per epoch: the only thing that differs between runs


@pytest.fixture(scope="module")
def finished_run(finished_tiny_run):
    """The whole tiny workflow, run once per session with umask 022 (conftest.py); read only."""
    return finished_tiny_run


def _damaged_copy(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished run with its modification times (what Snakemake compares)."""
    return copy_run(finished, tmp_path / "run")


def _assert_same_results(workdir: Path, reference: Path) -> None:
    for name in ("metrics.parquet", "robustness.parquet", "summary.parquet", "training.parquet"):
        ours, theirs = pd.read_parquet(workdir / "results/tables" / name), pd.read_parquet(reference / "results/tables" / name)
        pd.testing.assert_frame_equal(ours.drop(columns=TIMING_COLUMNS, errors="ignore"), theirs.drop(columns=TIMING_COLUMNS, errors="ignore"))
    for name in ("summary.md", "summary.csv"):
        assert (workdir / "results/tables" / name).read_text() == (reference / "results/tables" / name).read_text()
    figures = sorted(p.name for p in (reference / "results/figures").glob("*.png"))
    assert figures and figures == sorted(p.name for p in (workdir / "results/figures").glob("*.png"))
    for name in figures:
        assert (workdir / "results/figures" / name).read_bytes() == (reference / "results/figures" / name).read_bytes(), name


def _follow_the_message(workdir: Path, stderr: str, damaged: str, config: Path) -> None:
    """Find the one line that reports ``damaged`` and run the rebuild it gives (the `rm`, then
    Snakemake for that file alone), as a user would."""
    lines = [line for line in stderr.splitlines() if line.startswith("ncrobust: CorruptFileError: ")]
    assert lines, stderr[-3000:]
    assert all(line.startswith(f"ncrobust: CorruptFileError: {damaged}: unreadable or corrupt") for line in lines), lines
    command = re.search(r"rebuild it alone \(rm '([^']+)' && snakemake --cores 1 '([^']+)'\), then rerun the same snakemake command",
                        lines[0])
    assert command and command.group(1) == command.group(2) == damaged
    (workdir / command.group(1)).unlink()
    run_snakemake(workdir, command.group(2), configfile=config)


def test_every_output_is_readable_by_the_group_with_umask_022(finished_run):
    files = [p for p in (finished_run / "results").rglob("*") if p.is_file()]
    assert len(files) > 50
    private = [str(p.relative_to(finished_run)) for p in files if p.stat().st_mode & 0o777 != 0o644]
    assert not private, private[:10]


@pytest.mark.slow
def test_corrupt_checkpoint_and_deleted_files_are_rebuilt_by_the_same_command(tmp_path, finished_run):
    """Two kinds of damage to a finished run, repaired together by one rebuild:

    - garbage in a checkpoint (the st cell): the same command fails with one line naming the file,
      the cause (corrupt) and the rm command, never torch's weights_only=False; the user runs the rm;
    - deleted intermediate files (the pgd-linf cell, nothing else of it damaged): every per-cell
      file is a target of `rule all`, so a missing metrics file or training log is rebuilt even
      though the tables made from it exist (Snakemake otherwise says "Nothing to be done").

    After the rm, the same command rebuilds everything missing, the tables and figures equal the
    undamaged run's, and nothing is left to do."""
    workdir = _damaged_copy(finished_run, tmp_path)
    damaged = f"{ST_CELL}/checkpoints/epoch4.pt"  # the last one: fewer jobs to rebuild
    (workdir / damaged).write_bytes(b"garbage")
    deleted = [f"{CELL}/metrics/epoch2.parquet", f"{CELL}/train_log/epoch4.parquet"]
    for name in deleted:
        (workdir / name).unlink()
    config = workdir / "config.yaml"
    failed = run_snakemake(workdir, configfile=config, check=False)
    assert failed.returncode != 0, "the run over a corrupt checkpoint succeeded"
    assert "weights_only" not in failed.stdout + failed.stderr and "other than tensors" not in failed.stderr
    assert "Traceback" not in failed.stderr
    _follow_the_message(workdir, failed.stderr, damaged, config)
    run_snakemake(workdir, configfile=config)
    missing = [name for name in [damaged, *deleted] if not (workdir / name).is_file()]
    assert not missing, f"not rebuilt by the same command: {missing}"
    _assert_same_results(workdir, finished_run)
    assert "Nothing to be done" in run_snakemake(workdir, "-n", configfile=config).stdout


KEPT_AFTER_A_FAILING_RERUN = {
    # damaged file: outputs of the jobs Snakemake reruns because of it (their input is newer), which fail
    "checkpoints/epoch2.pt": [f"{ST_CELL}/checkpoints/epoch4.pt", f"{ST_CELL}/metrics/epoch2.parquet"],
    "metrics/epoch2.parquet": ["results/tables/metrics.parquet", "results/tables/summary.md"],
}


@pytest.mark.slow
@pytest.mark.parametrize("damaged", KEPT_AFTER_A_FAILING_RERUN)
def test_a_failing_rerun_keeps_the_previous_outputs(tmp_path, finished_run, damaged):
    """A damaged file is newer than the outputs made from it, so Snakemake reruns those jobs; they
    fail on it, and must leave the previous outputs in place (the checkpoint of the next segment,
    the metrics of that epoch; the tables, for a damaged metrics file)."""
    workdir = _damaged_copy(finished_run, tmp_path)
    (workdir / ST_CELL / damaged).write_bytes(b"garbage")
    failed = run_snakemake(workdir, "--keep-going", configfile=workdir / "config.yaml", check=False)
    assert failed.returncode != 0 and f"{ST_CELL}/{damaged}: unreadable or corrupt" in failed.stderr
    for name in KEPT_AFTER_A_FAILING_RERUN[damaged]:
        assert (workdir / name).is_file(), f"{name} was removed by a failing job"
        assert (workdir / name).read_bytes() == (finished_run / name).read_bytes()
