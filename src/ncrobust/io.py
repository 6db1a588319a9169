"""Atomic writes and safe loading: a crash never leaves a half-written file under a final name,
and a corrupt or untrusted file is reported with its path and the fix, never loaded silently."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch


class CorruptFileError(RuntimeError):
    """A result file exists but cannot be read back; the message names the path and the fix."""


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file, then rename."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code.

    A truncated, garbage or code-carrying file raises :class:`CorruptFileError` naming the path.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CorruptFileError(
            f"{path}: refused to load: it holds objects other than tensors and plain containers "
            f"({_first_line(err)}); delete it and rerun the workflow to rebuild it"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CorruptFileError(
            f"{path}: unreadable or truncated ({_first_line(err)}); "
            "delete it and rerun the workflow to rebuild it"
        ) from err


def write_parquet(frame, path: str | os.PathLike) -> None:
    """Write a DataFrame to Parquet atomically (no index)."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def read_parquet(path: str | os.PathLike):
    """Read a Parquet file, reporting a corrupt one with its path and the fix."""
    import pandas as pd
    import pyarrow as pa

    try:
        return pd.read_parquet(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise CorruptFileError(
            f"{path}: unreadable Parquet ({_first_line(err)}); delete it and rerun the workflow"
        ) from err


def write_text(text: str, path: str | os.PathLike) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextmanager
def job_log(path: str | os.PathLike) -> Iterator[None]:
    """Send a job's stdout, stderr (tqdm included) and ``logging`` to its log file.

    SIGTERM (SLURM preemption, ``scancel``) is turned into an exception, so that temporary files
    are removed and no half-written output remains. A failure's message is written to the log and
    re-raised so that the job fails.
    """
    import logging
    import signal
    import sys
    import traceback

    def _terminate(signum, frame):
        raise SystemExit(f"terminated by signal {signum}: no output was written; rerun the workflow to resume")

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _terminate)
    with open(path, "a", buffering=1) as fh:
        old_out, old_err = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = fh
        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            yield
        except BaseException as err:
            traceback.print_exc(file=fh)
            old_err.write(f"ncrobust: {type(err).__name__}: {err} (log: {path})\n")
            raise
        finally:
            root.removeHandler(handler)
            sys.stdout, sys.stderr = old_out, old_err
            signal.signal(signal.SIGTERM, previous)
