"""A throw-away single-node SLURM cluster for the integration tests.

``SlurmCluster`` starts MUNGE, ``slurmctld`` and ``slurmd`` from the system packages
(``.ci/install_slurm.sh`` installs Debian's) as root, with every file in one temporary directory:
its own MUNGE key and socket, its own ``slurm.conf`` and ports, state, spool and logs. Nothing
under ``/etc`` is read or written, and a system SLURM, if there is one, is left alone.

The node is the machine itself (``slurmd -C``: its real CPUs and memory) with one fake GPU
(``Gres=gpu:1`` backed by ``/dev/null``), so that ``--gpus=1`` requests are scheduled and get
``CUDA_VISIBLE_DEVICES`` like on a GPU node. There is no ``slurmdbd``, so ``sacct`` does not work
(``Slurm accounting storage is disabled``); the Snakemake SLURM plugin is told to check job states
with ``squeue`` instead, which needs finished jobs to stay visible: ``MinJobAge=600``.

Two things a real cluster gets from ``/etc/slurm/slurm.conf`` are provided otherwise here:
the client commands find the configuration through ``SLURM_CONF`` (in ``cluster.env``), and,
because the plugin's job step (``snakemake-executor-plugin-slurm-jobstep``) removes every
``SLURM_*`` variable before it calls ``srun`` inside the job, ``cluster.env["PATH"]`` starts with
a directory holding an ``srun`` wrapper that sets ``SLURM_CONF`` again.

Use it as a context manager::

    with SlurmCluster(workdir) as cluster:
        subprocess.run(["sbatch", "--wrap", "hostname"], env=cluster.env)
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")


def unavailable_reason() -> str | None:
    """Why a test cluster cannot be started here, or None when it can."""
    missing = [cmd for cmd in (*DAEMONS, *CLIENTS, "munge", "unmunge") if _which(cmd) is None]
    if missing:
        return f"SLURM/MUNGE not installed (missing: {', '.join(missing)}); run .ci/install_slurm.sh"
    if os.geteuid() != 0:
        return "the test SLURM cluster runs its daemons as root (SlurmUser=root); not root here"
    return None


def _which(cmd: str) -> str | None:
    # The daemons live in /usr/sbin, which is not on every user's PATH.
    return shutil.which(cmd) or shutil.which(cmd, path="/usr/sbin:/usr/local/sbin:/sbin")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_hardware() -> dict[str, str]:
    """The machine as slurmd sees it: ``slurmd -C`` (CPUs, sockets, cores, threads, RealMemory)."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    first = out.splitlines()[0]
    fields = dict(item.split("=", 1) for item in first.split() if "=" in item)
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    return {key: fields[key] for key in keep if key in fields}


class SlurmCluster:
    """A single-node SLURM cluster in a temporary directory; see the module docstring."""

    partition = "debug"
    cluster_name = "ncrobust-test"

    def __init__(self, root: str | os.PathLike | None = None, *, min_job_age: int = 600, start_timeout: float = 60.0):
        self._own_root = root is None
        # A short path: the MUNGE socket path must fit in a sockaddr_un (108 bytes).
        self.root = Path(tempfile.mkdtemp(prefix="ncslurm-", dir="/tmp") if root is None else root).resolve()
        self.min_job_age = min_job_age
        self.start_timeout = start_timeout
        self.conf = self.root / "etc" / "slurm.conf"
        self.log_dir = self.root / "log"
        self.bin_dir = self.root / "bin"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.node = socket.gethostname().split(".")[0]
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []
        self.env = self._make_env()

    # ------------------------------------------------------------------ set-up
    def _make_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SQUEUE_"))}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([str(self.bin_dir), env.get("PATH", ""), "/usr/sbin"])
        return env

    def _write_files(self) -> None:
        for sub in ("etc", "log", "state", "spool", "bin", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged wants its socket directory world-searchable and its key private.
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "munge", 0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)

        hw = node_hardware()
        node_line = " ".join(f"{k}={v}" for k, v in hw.items())
        ctld_port, slurmd_port = _free_port(), _free_port()
        while slurmd_port == ctld_port:
            slurmd_port = _free_port()
        r = self.root
        self.conf.write_text(
            f"""# Written by tests/slurm_cluster.py: a single-node test cluster, no accounting database.
ClusterName={self.cluster_name}
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/slurmd
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
MpiDefault=none
SwitchType=switch/none
# No cgroups in a container.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd: sacct/sacctmgr do not work; job states come from squeue, which keeps
# finished jobs for MinJobAge seconds.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge={self.min_job_age}
ReturnToService=2
# A test machine may be loaded by the rest of the suite: allow the daemons and clients more than
# the defaults (10 s for an RPC and for a batch job's launch, 300 s of silence from slurmd) before
# they give a job or a node up.
MessageTimeout=60
BatchStartTimeout=120
SlurmdTimeout=900
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
NodeName={self.node} NodeAddr=127.0.0.1 {node_line} Gres=gpu:1 State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        )
        # A fake GPU: scheduled like a real one, CUDA_VISIBLE_DEVICES=0 in the job.
        (self.root / "etc" / "gres.conf").write_text(f"NodeName={self.node} Name=gpu File=/dev/null\n")
        (r / "spool" / "slurmd").mkdir(exist_ok=True)

        # The plugin's job step strips SLURM_* (SLURM_CONF included) before its inner `srun`.
        srun = self.bin_dir / "srun"
        srun.write_text(f'#!/bin/sh\nSLURM_CONF="{self.conf}" exec "{_which("srun")}" "$@"\n')
        srun.chmod(0o755)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.log_dir / f"{name}.out", "wb")
        self._logs.append(log)
        self._procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def start(self) -> "SlurmCluster":
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        self._write_files()
        m = self.root / "munge"
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                               f"--seed-file={m / 'munged.seed'}", f"--log-file={self.log_dir / 'munged.log'}"])
        self._wait(lambda: self._munge_ok(), "munged to answer")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
        self._wait(lambda: self.node_state() == "idle", f"node {self.node} to be idle")
        return self

    def _munge_ok(self) -> bool:
        enc = subprocess.run(["munge", "-n", "-S", str(self.munge_socket)], capture_output=True)
        if enc.returncode != 0:
            return False
        dec = subprocess.run(["unmunge", "-S", str(self.munge_socket)], input=enc.stdout, capture_output=True)
        return dec.returncode == 0

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out after {self.start_timeout:.0f} s waiting for {what}:\n{self.logs()}")

    # ----------------------------------------------------------------- queries
    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> str:
        """Run a SLURM client command against this cluster; its stdout."""
        proc = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def node_state(self) -> str:
        try:
            out = self.run("sinfo", "--noheader", "--Node", "--format=%T", check=False, timeout=10)
        except subprocess.TimeoutExpired:
            return ""
        return out.strip().rstrip("*~#")

    def jobs(self) -> list[dict[str, str]]:
        """Every job the controller still knows (finished ones for MinJobAge): ``scontrol show job -o``."""
        out = self.run("scontrol", "show", "job", "--oneliner", "--details")
        jobs = []
        for line in out.splitlines():
            if not line.strip() or line.startswith("No jobs"):
                continue
            # "Key=value Key=value ...": a value ends where the next " Key=" begins.
            pairs = re.finditer(r"(?:^|\s)([A-Za-z][\w:/]*)=(.*?)(?=\s+[A-Za-z][\w:/]*=|\s*$)", line)
            fields = {key: value.strip() for key, value in (m.groups() for m in pairs)}
            jobs.append(fields)
        return jobs

    @staticmethod
    def requests_gpu(job: dict[str, str]) -> bool:
        """Whether a job (from ``jobs()``) asked for a GPU (--gpus, --gres=gpu, --gpus-per-*)."""
        keys = ("TresPerJob", "TresPerNode", "TresPerTask", "TresPerSocket", "TRES", "ReqTRES")
        return any("gpu" in job.get(k, "") for k in keys)

    @staticmethod
    def gpu_count(job: dict[str, str]) -> int:
        """How many GPUs a job (from ``jobs()``) asked for: ``--gpus=N`` and ``--gres=gpu:N`` show as
        ``gres:gpu:N`` or ``gres/gpu:N`` (with a type: ``gres/gpu:a100:N``) in its TRES fields."""
        for key in ("TresPerJob", "TresPerNode", "TresPerTask", "TRES", "ReqTRES"):
            found = re.search(r"gres[:/]gpu(?::[A-Za-z][\w.]*)?[:=](\d+)", job.get(key, ""))
            if found:
                return int(found.group(1))
        return 0

    def logs(self, tail: int = 40) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*")):
            if path.is_file():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # --------------------------------------------------------------- tear-down
    def stop(self) -> None:
        if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
            try:
                self.run("scancel", "--full", f"--user={pwd.getpwuid(os.geteuid()).pw_name}", check=False, timeout=10)
                # Give slurmd a moment to end the job steps it started.
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and self.run(
                    "squeue", "--noheader", "--states=RUNNING,COMPLETING", "--format=%i", check=False, timeout=10
                ).strip():
                    time.sleep(0.5)
            except subprocess.TimeoutExpired:
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "SlurmCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
