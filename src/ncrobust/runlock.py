"""Snakemake's directory lock after a killed run: removed when it is surely stale, else one line.

Snakemake locks the files a run will write (``.snakemake/locks``) and removes the lock when the run
ends; a run killed with SIGKILL (the out-of-memory killer, a lost node) leaves it, and the next run
stops until ``snakemake --unlock``. The lock files do not say which process wrote them, so each
run of this workflow that takes the lock records its process while it holds it
(``.snakemake/ncrobust/runs/HOST.PID``, with the process's start time against a reused PID;
written when the run starts its jobs, removed when it ends, so a record left behind is a killed
run's). A later run that finds lock files and such records, all from this machine and none of a
process still alive, knows the lock is stale and removes it, as ``--unlock`` would. Otherwise it
leaves the decision to Snakemake, whose refusal (only when the two runs' files overlap) becomes
one line naming ``--unlock`` and when it is safe.
Torch-free: the Snakefile imports it at parse time.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

LOCKS = Path(".snakemake/locks")
RUNS = Path(".snakemake/ncrobust/runs")

LOCKED_ADVICE = (
    "another Snakemake run holds a lock on files this run would write ({locks} in {directory}): wait for it to "
    "finish; if no Snakemake process runs in this directory on any machine, the lock was left by a killed run, "
    "and `snakemake --unlock` followed by the same command resumes safely"
)


@dataclass(frozen=True)
class Run:
    """A recorded run: the machine, the process and its start time (None where unknown)."""

    host: str
    pid: int
    started: str | None

    @property
    def name(self) -> str:
        return f"{self.host}.{self.pid}"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None elsewhere or if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _alive(run: Run) -> bool:
    """Whether the recorded process still runs (a reused PID with another start time does not)."""
    try:
        os.kill(run.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user: alive
        return True
    return run.started is None or _start_time(run.pid) in (None, run.started)


def _read(path: Path) -> Run | None:
    host, _, pid = path.name.rpartition(".")
    if not host or not pid.isdigit():
        return None
    try:
        started = path.read_text().strip() or None
    except OSError:
        return None
    return Run(host, int(pid), started)


def record_run(directory: str | os.PathLike = ".", *, pid: int | None = None) -> Run:
    """Record this process as the holder of a lock in ``directory`` (when its jobs start: Snakemake
    has taken the lock by then); :func:`release_run` removes the record when the run ends."""
    pid = os.getpid() if pid is None else pid
    run = Run(socket.gethostname(), pid, _start_time(pid))
    runs = Path(directory) / RUNS
    runs.mkdir(parents=True, exist_ok=True)
    (runs / run.name).write_text(run.started or "")
    return run


def release_run(directory: str | os.PathLike = ".", *, pid: int | None = None) -> None:
    """Remove this process's record (the run ended and Snakemake removed its lock)."""
    pid = os.getpid() if pid is None else pid
    (Path(directory) / RUNS / f"{socket.gethostname()}.{pid}").unlink(missing_ok=True)


def clear_stale_lock(directory: str | os.PathLike = ".", *, own_pid: int | None = None) -> list[Run]:
    """Remove Snakemake's lock in ``directory`` if it is surely stale: lock files exist, a run of
    this workflow that held a lock did not end (its record is left), every such record is from
    this machine and none of their processes still runs. Clears the records of processes gone
    either way. Returns the killed runs whose lock was removed (empty: nothing removed, Snakemake
    decides)."""
    directory = Path(directory)
    own_pid = os.getpid() if own_pid is None else own_pid
    host = socket.gethostname()
    runs = [r for r in (_read(p) for p in sorted((directory / RUNS).glob("*"))) if r is not None]
    others = [r for r in runs if not (r.host == host and r.pid == own_pid)]
    here = [r for r in others if r.host == host]
    finished = [r for r in here if not _alive(r)]
    for run in finished:
        (directory / RUNS / run.name).unlink(missing_ok=True)
    locks = list((directory / LOCKS).glob("*.lock"))
    if not locks or not others or len(finished) < len(others):
        return []
    for lock in locks:
        lock.unlink(missing_ok=True)
    return finished


def locked_message(directory: str | os.PathLike = ".") -> str:
    """The one line that replaces Snakemake's refusal to run in a locked directory."""
    return LOCKED_ADVICE.format(locks=LOCKS, directory=os.path.abspath(directory))
