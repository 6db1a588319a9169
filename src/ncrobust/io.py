"""Atomic writes and safe loading: a crash never leaves a half-written file under a final name,
and a corrupt or untrusted file is reported with its path and the fix, never loaded silently."""

from __future__ import annotations

import errno
import os
import pickle
import secrets
import shutil
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # torch is imported where it is used: the Snakefile reads archive_damage at parse time
    import torch


class ExplainedError(Exception):
    """An error whose message says what is wrong and how to recover: a job that fails with it
    reports that one line (the traceback goes to its log only)."""


class CorruptFileError(RuntimeError):
    """A result file exists but cannot be read back; the message names the path and the fix."""

    @classmethod
    def at(cls, path: str | os.PathLike, cause: str) -> "CorruptFileError":
        """The one-line report of an unreadable ``path``: what is wrong and the command that recovers."""
        return cls(
            f"{path}: {cause}; rebuild it alone (rm '{path}' && snakemake --cores 1 '{path}'), then rerun the "
            "same snakemake command: what is made from it reruns only if its content changed"
        )


class OutdatedFileError(RuntimeError):
    """A result file written by an older ncrobust, without what this one reads; the message names
    the path and the command that rebuilds it."""

    @classmethod
    def at(cls, path: str | os.PathLike, missing: str, rule: str) -> "OutdatedFileError":
        return cls(f"{path}: written by an older ncrobust (it has no {missing}); rebuild it: snakemake --forcerun {rule}")


class DiskFullError(OSError):
    """A write failed for lack of space (disk full or quota exceeded); the message names the path."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" prefix
        return str(self.strerror)


_TORCH_ADVICE = ("weights_only", "please file an issue", "check the documentation", "if you are seeing this error")


def _first_line(err: BaseException) -> str:
    """The first informative line of ``err``, without torch's generic advice (which, for a
    checkpoint refused by ``weights_only=True``, is to load it unsafely)."""
    for line in str(err).strip().splitlines():
        line = line.split(" This is an internal miniz error")[0].strip().rstrip(":").strip()
        if line and not any(advice in line.lower() for advice in _TORCH_ADVICE):
            return line
    return type(err).__name__


def _is_disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT from Python or pyarrow, or torch's zip writer's short write (it loses the errno:
    ``[enforce fail at inline_container.cc:...] . unexpected pos N vs M``)."""
    if isinstance(err, OSError):
        text = str(err)
        return err.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "quota exceeded" in text.lower()
    return isinstance(err, RuntimeError) and "inline_container" in str(err) and "unexpected pos" in str(err)


def _disk_full_error(path: Path, err: BaseException) -> DiskFullError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there now"
    except OSError:
        free = "free space unknown"
    return DiskFullError(
        errno.ENOSPC,
        f"{path}: could not be written: no space left on the device (disk full or quota exceeded; {free}; "
        f"{_first_line(err)}). Nothing half-written was kept: free some space (or set `results:` to a "
        "larger file system), then rerun the same snakemake command",
    )


def _create_temporary(path: Path) -> Path:
    """A new empty file next to ``path``, created with mode 0666 minus the umask (as ``open`` does;
    ``tempfile.mkstemp`` would make it 0600 whatever the umask, and the rename would keep that)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{path.parent}: could not create a unique temporary file for {path.name}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    The file gets the permissions the umask allows; a full disk raises :class:`DiskFullError` naming
    ``path`` (whatever library was writing), and the temporary file is removed.
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = _create_temporary(path)
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as err:
        if _is_disk_full(err) and not isinstance(err, DiskFullError):
            raise _disk_full_error(path, err) from None
        raise
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file, then rename. Saved through a file object, so that the
    archive's inner folder is torch's fixed ``archive`` and not the temporary file's random name:
    the same object gives the same bytes, and Snakemake's checksums see a rebuilt file as unchanged."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def archive_damage(path: str | os.PathLike) -> str | None:
    """Why an existing ``torch.save`` file cannot be a checkpoint (``None`` when it can): torch
    always writes a zip archive, anything else is damaged (truncated, overwritten). Cheap (the
    archive's directory only), so the Snakefile checks every intermediate file before a run."""
    if zipfile.is_zipfile(path):
        return None
    size = Path(path).stat().st_size
    return f"unreadable or corrupt: not a PyTorch checkpoint archive ({size} bytes: truncated or overwritten)"


def load_torch(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code.

    A truncated, garbage or code-carrying file raises :class:`CorruptFileError` naming the path, the
    cause and the command that recovers. The original error is not chained: torch's advice for a
    refused file is to load it with ``weights_only=False``, which would run whatever it carries.
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    damage = archive_damage(path)
    if damage:
        raise CorruptFileError.at(path, damage)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err):  # a well-formed archive that references code: refused, never run
            cause = f"refused: it holds pickled objects other than tensors and plain containers ({_first_line(err)})"
        else:
            cause = f"unreadable or corrupt: its data cannot be decoded ({_first_line(err)})"
        error = CorruptFileError.at(path, cause)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, IndexError, OSError) as err:
        error = CorruptFileError.at(path, f"unreadable or corrupt ({_first_line(err)})")
    raise error


def unwritable_directory(paths) -> str | None:
    """The first directory that files in ``paths`` would be written into (their nearest existing
    ancestor: missing ones are created there) and that cannot be written: a read-only mount,
    another user's or group's directory. None if all can. Checked before any job starts, so that
    a run stops in one line instead of a job failing on its log file."""
    checked: set[str] = set()
    for path in paths:
        directory = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(directory):
            directory = os.path.dirname(directory)
        if directory in checked:
            continue
        checked.add(directory)
        if not os.access(directory, os.W_OK | os.X_OK):
            return directory
    return None


def write_parquet(frame, path: str | os.PathLike) -> None:
    """Write a DataFrame to Parquet atomically (no index)."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def read_parquet(path: str | os.PathLike):
    """Read a Parquet file, reporting a corrupt one with its path and the fix."""
    import pandas as pd
    import pyarrow as pa

    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return pd.read_parquet(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise CorruptFileError.at(path, f"unreadable or corrupt Parquet file ({_first_line(err)})") from err


def write_text(text: str, path: str | os.PathLike) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextmanager
def job_log(path: str | os.PathLike) -> Iterator[None]:
    """Send a job's stdout, stderr (tqdm included) and ``logging`` to its log file.

    SIGTERM (SLURM preemption, ``scancel``) is turned into an exception, so that temporary files
    are removed and no half-written output remains. A failure's message is written to the log and
    re-raised so that the job fails; a corrupt or outdated file or a full disk is that one line on
    stderr (the traceback goes to the log only), so that the cause and the fix are not buried in a
    traceback.
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
            if isinstance(err, (ExplainedError, CorruptFileError, OutdatedFileError, DiskFullError)):
                # the line above says all a user needs; the traceback is in the log
                raise SystemExit(1) from None
            raise
        finally:
            root.removeHandler(handler)
            sys.stdout, sys.stderr = old_out, old_err
            signal.signal(signal.SIGTERM, previous)
