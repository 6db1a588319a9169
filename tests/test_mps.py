"""ncrobust.mps against a stand-in for nvidia-cuda-mps-control (the real one needs a GPU): the
stand-in records each start, creates the control socket's path and quits on "quit", as MPS does."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from ncrobust import mps

FAKE_CONTROL = textwrap.dedent("""\
    #!/usr/bin/env python3
    import os, sys, time
    pipe = os.environ["CUDA_MPS_PIPE_DIRECTORY"]
    if sys.argv[1:] == ["-f"]:  # the daemon
        with open(os.path.join(os.environ["CUDA_MPS_LOG_DIRECTORY"], "starts"), "a") as f:
            f.write("start\\n")
        if os.environ.get("FAKE_MPS_FAIL"):
            sys.exit(3)
        time.sleep(0.3)  # a daemon takes a moment to open its socket
        open(os.path.join(pipe, "control"), "w").close()
        while not os.path.exists(os.path.join(pipe, "quit")):
            time.sleep(0.02)
        os.remove(os.path.join(pipe, "control"))
    else:  # a client: one command on stdin
        if sys.stdin.read().strip() == "quit":
            open(os.path.join(pipe, "quit"), "w").close()
    """)


@pytest.fixture
def control(tmp_path, monkeypatch):
    path = tmp_path / "bin" / mps.CONTROL
    path.parent.mkdir()
    path.write_text(FAKE_CONTROL.replace("#!/usr/bin/env python3", f"#!{sys.executable}", 1))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{path.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(mps.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    for variable in (mps.PIPE_VARIABLE, mps.LOG_VARIABLE):
        monkeypatch.delenv(variable, raising=False)
    return path


def _starts(key: str) -> int:
    starts = mps.daemon_root(key) / "log" / "starts"
    return len(starts.read_text().splitlines()) if starts.exists() else 0


@pytest.mark.workflow
def test_start_points_cuda_at_one_daemon_and_stop_ends_it(control):
    env = mps.start("job1")
    root = mps.daemon_root("job1")
    assert env == {mps.PIPE_VARIABLE: str(root / "pipe"), mps.LOG_VARIABLE: str(root / "log")}
    assert {k: os.environ[k] for k in env} == env  # this process's CUDA connects to it
    assert (root / "pipe" / "control").exists()
    assert mps.start("job1") == env and _starts("job1") == 1  # running: not started again
    mps.stop("job1")
    assert not mps._alive(root / "pid")
    assert not (root / "pipe" / "control").exists()
    mps.stop("job1")  # stopping a stopped daemon is a no-op


@pytest.mark.workflow
def test_processes_racing_to_start_the_daemon_start_it_once(control, tmp_path):
    code = "from ncrobust import mps; import tempfile; tempfile.gettempdir = lambda: {!r}; mps.start('race')".format(str(tmp_path / "tmp"))
    racers = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(4)]
    assert [p.wait(timeout=60) for p in racers] == [0, 0, 0, 0]
    assert _starts("race") == 1
    mps.stop("race")
    assert not mps._alive(mps.daemon_root("race") / "pid")


@pytest.mark.workflow
def test_a_daemon_that_dies_at_start_is_a_one_line_error_naming_its_log(control, monkeypatch):
    monkeypatch.setenv("FAKE_MPS_FAIL", "1")
    with pytest.raises(mps.MPSUnavailableError, match=r"did not start \(exit 3\); see .*ncrobust-mps-bad/log"):
        mps.start("bad")


def test_no_mps_binary_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(mps.MPSUnavailableError, match="nvidia-cuda-mps-control not found"):
        mps.start("none")


@pytest.mark.workflow
def test_a_training_job_joins_its_allocations_daemon_only_inside_slurm(control, monkeypatch, caplog):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with caplog.at_level("INFO", logger="ncrobust.mps"):
        assert mps.join_allocation_daemon() is False
    assert "no effect outside a SLURM job" in caplog.text
    assert not mps.daemon_root("slurm77").exists()
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert mps.join_allocation_daemon() is True
    assert os.environ[mps.PIPE_VARIABLE] == str(mps.daemon_root("slurm77") / "pipe")
    assert mps.join_allocation_daemon() is True and _starts("slurm77") == 1  # the allocation's next job
    mps.stop("slurm77")


def test_without_mps_on_the_node_a_training_job_goes_on_without_it(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with caplog.at_level("WARNING", logger="ncrobust.mps"):
        assert mps.join_allocation_daemon() is False
    assert "training without it" in caplog.text


@pytest.mark.workflow
def test_a_daemon_that_died_is_started_again_and_its_stale_socket_is_not_taken_for_the_new_one(control):
    import signal

    mps.start("job2")
    root = mps.daemon_root("job2")
    old = int((root / "pid").read_text())
    os.kill(old, signal.SIGKILL)
    os.waitpid(old, 0)
    (root / "pipe" / "control").write_text("stale")  # left behind, as by a killed MPS daemon
    mps.start("job2")
    new = int((root / "pid").read_text())
    assert new != old and mps._alive(root / "pid") and _starts("job2") == 2
    assert (root / "pipe" / "control").read_text() == ""  # start returned once the new daemon had made its own
    mps.stop("job2")
