"""Write outputs under a temporary name and rename them only when all are complete.

A killed or failing job then never leaves a file that looks finished. A temporary file
that a killed writer left behind is removed by the next write of the same output.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

from plumbing.errors import OutputError


def _temporary_name(path: Path, pid: int | None = None) -> Path:
    # Same folder (so the rename is atomic) and same suffix (so writers that look
    # at the extension, like cv2.imwrite, still pick the right format).
    return path.with_name(f".{path.stem}.tmp-{os.getpid() if pid is None else pid}{path.suffix}")


@contextlib.contextmanager
def atomic_outputs(*paths: str | os.PathLike | None) -> Iterator[list[Path | None]]:
    """Yield temporary paths for `paths` (None passes through); rename all on success.

    On any exception every temporary file is removed and nothing is renamed.
    OS errors (disk full, permission denied) become one clear `OutputError` naming the
    output: `<path>: cannot write output (<reason>)`.
    """
    finals = [Path(p) if p is not None else None for p in paths]
    temps = [_temporary_name(p) if p is not None else None for p in finals]
    try:
        for final in finals:
            if final is not None:
                final.parent.mkdir(parents=True, exist_ok=True)
                remove_stale_temporaries(final)
        yield temps
        for temp, final in zip(temps, finals, strict=True):
            if temp is not None:
                os.replace(temp, final)
    except OSError as err:
        if not err.filename:  # a failed write() names no file: the last one written to
            written = [
                (t.stat().st_mtime_ns, i, t) for i, t in enumerate(temps) if t and t.exists()
            ]
            if written:
                err.filename = str(max(written)[2])  # ties: the later in writing order
        _remove(temps)
        raise output_error(_output_named(err, finals, temps), err) from None
    except BaseException:
        _remove(temps)
        raise


def output_error(path: str | os.PathLike, err: OSError) -> OutputError:
    """The one-line error of every CLI for an output it cannot write."""
    return OutputError(f"{path}: cannot write output ({os_error_reason(err)})")


@contextlib.contextmanager
def output_errors(path: str | os.PathLike) -> Iterator[None]:
    """OS errors in the block become `output_error(path)`: for outputs written in place,
    like logs (TensorBoard event files), that `atomic_outputs` does not cover."""
    try:
        yield
    except OSError as err:
        raise output_error(path, err) from None


@contextlib.contextmanager
def buffered(path: str | os.PathLike) -> Iterator[io.BytesIO]:
    """A file object in memory, written to `path` in one plain write when the block ends.

    For writers that report a failed write badly (h5py's HDF5 error stacks and crashes
    at exit, torch's RuntimeErrors): they write into memory, which cannot fail, and the
    disk write raises an ordinary OSError (ENOSPC, EFBIG, EACCES) for `atomic_outputs`.
    """
    buffer = io.BytesIO()
    yield buffer
    try:
        with open(path, "wb") as file:
            file.write(buffer.getbuffer())
    except OSError as err:
        err.filename = err.filename or str(path)  # a failed write() names no file
        raise


def remove_stale_temporaries(final: Path) -> None:
    """Delete temporary files of `final` whose writer is gone (a killed job's leftovers)."""
    prefix, suffix = f".{final.stem}.tmp-", final.suffix
    with contextlib.suppress(OSError):
        for candidate in final.parent.glob(f"{glob.escape(prefix)}*{glob.escape(suffix)}"):
            pid = candidate.name[len(prefix) : len(candidate.name) - len(suffix)]
            if pid.isdigit() and not _process_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    candidate.unlink()


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # an earlier, failed attempt of this very process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def os_error_reason(err: OSError) -> str:
    """A short, one-line reason for an OSError, also for HDF5's multi-line ones."""
    code = err.errno
    if code is None:  # h5py: "..., errno = 28, error message = ..."
        found = re.search(r"errno = (\d+)", str(err))
        code = int(found[1]) if found else None
    reasons = {
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EFBIG: "file too large",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EROFS: "read-only file system",
    }
    if code in reasons:
        return reasons[code]
    if code is not None and err.errno is not None and err.strerror:
        return err.strerror
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _output_named(err: OSError, finals: list[Path | None], temps: list[Path | None]) -> str:
    """The final output the error is about (not its temporary name), or the first output."""
    filename = str(err.filename) if err.filename else None
    for final, temp in zip(finals, temps, strict=True):
        if final is not None and filename in (str(final), str(temp)):
            return str(final)
    if filename:
        for final in finals:  # mkdir of a parent folder
            if final is not None and str(final).startswith(filename.rstrip("/") + "/"):
                return str(final)
        return filename
    return next((str(p) for p in finals if p is not None), "?")


def _remove(paths: list[Path | None]) -> None:
    for path in paths:
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
