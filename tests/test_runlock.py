"""Snakemake's lock after a killed run (ncrobust.runlock): removed only when surely stale."""

import os
import socket

from ncrobust.runlock import LOCKS, RUNS, clear_stale_lock, locked_message, record_run, release_run


def _locked(directory):
    (directory / LOCKS).mkdir(parents=True)
    for name in ("0.input.lock", "0.output.lock"):
        (directory / LOCKS / name).write_text("results/x\n")


def _gone_pid() -> int:
    """A PID no process has (the highest possible, counting down past any in use)."""
    pid = 4_194_304
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_a_killed_runs_lock_is_removed_and_its_record_cleared(tmp_path):
    _locked(tmp_path)
    killed = record_run(tmp_path, pid=_gone_pid())
    assert clear_stale_lock(tmp_path) == [killed]
    assert not list((tmp_path / LOCKS).glob("*")) and not list((tmp_path / RUNS).glob("*"))


def test_a_running_process_keeps_its_lock(tmp_path):
    _locked(tmp_path)
    record_run(tmp_path, pid=_gone_pid())
    record_run(tmp_path, pid=os.getppid())  # alive: the lock may be its
    assert clear_stale_lock(tmp_path, own_pid=os.getpid()) == []
    assert len(list((tmp_path / LOCKS).glob("*"))) == 2
    assert [p.name for p in (tmp_path / RUNS).iterdir()] == [f"{socket.gethostname()}.{os.getppid()}"]  # the gone one cleared


def test_a_reused_pid_does_not_count_as_the_recorded_run(tmp_path):
    """The record holds the process's start time: another process with the same PID is not it."""
    _locked(tmp_path)
    run = record_run(tmp_path, pid=os.getppid())
    (tmp_path / RUNS / run.name).write_text("1")  # started at tick 1: not the process now under that PID
    assert clear_stale_lock(tmp_path, own_pid=os.getpid()) != []
    assert not list((tmp_path / LOCKS).glob("*"))


def test_a_lock_without_a_record_or_with_another_machines_stays(tmp_path):
    _locked(tmp_path)
    assert clear_stale_lock(tmp_path) == []  # no run of this workflow recorded: Snakemake decides
    (tmp_path / RUNS).mkdir(parents=True)
    (tmp_path / RUNS / "other-node.123").write_text("")
    record_run(tmp_path, pid=_gone_pid())
    assert clear_stale_lock(tmp_path) == []  # the other machine's run may be alive
    assert len(list((tmp_path / LOCKS).glob("*"))) == 2


def test_no_lock_removes_nothing_and_own_record_is_released(tmp_path):
    run = record_run(tmp_path)
    assert clear_stale_lock(tmp_path) == []
    assert (tmp_path / RUNS / run.name).exists()  # this process is alive, and it is itself
    release_run(tmp_path)
    assert not (tmp_path / RUNS / run.name).exists()


def test_the_refusal_is_one_line_naming_unlock(tmp_path):
    line = locked_message(tmp_path)
    assert "\n" not in line and "`snakemake --unlock` followed by the same command" in line and str(tmp_path) in line
