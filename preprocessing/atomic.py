"""Write outputs under a temporary name and rename them only when all are complete.

A killed or failing job then never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from preprocessing.errors import OutputError


def _temporary_name(path: Path) -> Path:
    # Same folder (so the rename is atomic) and same suffix (so writers that look
    # at the extension, like cv2.imwrite, still pick the right format).
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def atomic_outputs(*paths: str | os.PathLike | None) -> Iterator[list[Path | None]]:
    """Yield temporary paths for `paths` (None passes through); rename all on success.

    On any exception every temporary file is removed and nothing is renamed.
    OS errors (disk full, permission denied) become one clear `OutputError`.
    """
    finals = [Path(p) if p is not None else None for p in paths]
    temps = [_temporary_name(p) if p is not None else None for p in finals]
    try:
        for final in finals:
            if final is not None:
                final.parent.mkdir(parents=True, exist_ok=True)
        yield temps
        for temp, final in zip(temps, finals, strict=True):
            if temp is not None:
                os.replace(temp, final)
    except OSError as err:
        _remove(temps)
        target = err.filename or next((str(p) for p in finals if p is not None), "?")
        reason = {
            errno.ENOSPC: "no space left on device",
            errno.EACCES: "permission denied",
            errno.EROFS: "read-only file system",
        }.get(err.errno, err.strerror or str(err))
        raise OutputError(f"{target}: cannot write output ({reason})") from err
    except BaseException:
        _remove(temps)
        raise


def _remove(paths: list[Path | None]) -> None:
    for path in paths:
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
