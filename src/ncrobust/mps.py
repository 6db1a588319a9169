"""CUDA MPS (Multi-Process Service) for several training processes on one GPU.

Without MPS, processes that share a GPU take turns (time slicing): two PreActResNet18 cells
trained at once got 0.97x the images/s of one. Under one MPS daemon their kernels run side by side,
which pays at batch 128, where one graphed step does not fill an H100 (``benchmarks/gpu_cell.py
--packed 1 2 --mps``; the numbers are in the README). Results are the same with or without it.

The config key ``mps: true`` makes every training job join the daemon of its SLURM allocation
(:func:`join_allocation_daemon`), starting it if it is the first job there. The daemon lives as
long as the allocation: SLURM ends it with the job's other processes. Outside a SLURM job the key
does nothing (a daemon started there would outlive the workflow): a log line says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

CONTROL = "nvidia-cuda-mps-control"
PIPE_VARIABLE, LOG_VARIABLE = "CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"
START_TIMEOUT_S = 30.0


class MPSUnavailableError(RuntimeError):
    """The machine has no MPS control binary."""


def daemon_root(key: str) -> Path:
    """The folder of the daemon called ``key`` (its pipe and log folders, pid and lock files)."""
    return Path(tempfile.gettempdir()) / f"ncrobust-mps-{key}"


def _environment(root: Path) -> dict[str, str]:
    return {PIPE_VARIABLE: str(root / "pipe"), LOG_VARIABLE: str(root / "log")}


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


def start(key: str) -> dict[str, str]:
    """Start the daemon ``key`` unless it runs already (processes racing to start it agree under a
    file lock), point this process's CUDA at it, and return the environment variables that point
    other processes at it. Call it before this process's first CUDA call: CUDA reads them once."""
    control = shutil.which(CONTROL)
    if control is None:
        raise MPSUnavailableError(f"{CONTROL} not found on PATH: this machine's CUDA install has no MPS")
    root = daemon_root(key)
    env = _environment(root)
    for folder in env.values():
        Path(folder).mkdir(parents=True, exist_ok=True)
    pid_file = root / "pid"
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _alive(pid_file):
            (root / "pipe" / "control").unlink(missing_ok=True)  # a dead daemon's socket: wait for the new one's
            with open(root / "log" / "daemon.out", "ab") as out:
                # -f: in the foreground of its own session, so that its pid is known and it outlives this process
                daemon = subprocess.Popen([control, "-f"], env={**os.environ, **env}, stdout=out, stderr=out,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
            pid_file.write_text(str(daemon.pid))
            deadline = time.monotonic() + START_TIMEOUT_S
            while not (root / "pipe" / "control").exists():
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise MPSUnavailableError(f"the MPS daemon did not start (exit {daemon.poll()}); see {root / 'log'}")
                time.sleep(0.05)
    os.environ.update(env)
    return env


def stop(key: str) -> None:
    """Ask the daemon ``key`` to quit (it waits for its clients to finish) and wait for it."""
    root = daemon_root(key)
    pid_file = root / "pid"
    if not _alive(pid_file):
        return
    subprocess.run([shutil.which(CONTROL) or CONTROL], input=b"quit\n", env={**os.environ, **_environment(root)},
                   check=False, capture_output=True, timeout=60)
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 60
    while _alive(pid_file) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if this process started it
        time.sleep(0.05)


def join_allocation_daemon() -> bool:
    """Join (or start) the MPS daemon of this SLURM allocation; False, with a log line, outside
    SLURM or where MPS is missing (the job then shares the GPU by time slicing, as without ``mps``)."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        log.info("mps: true has no effect outside a SLURM job")
        return False
    try:
        start(f"slurm{job}")
    except MPSUnavailableError as err:
        log.warning("mps: %s; training without it", err)
        return False
    log.info("joined the CUDA MPS daemon of SLURM job %s", job)
    return True
