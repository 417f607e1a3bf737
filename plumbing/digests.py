"""SHA-256 of checkpoint files, remembered across processes.

Every extraction job records the digest of its weights file; hashing a 1.2 GB ViT-L
checkpoint takes over a second, once per slide. The digest is kept in a small JSON file
under the user's cache folder, keyed by the file's resolved path, size, mtime and inode
(as git's index trusts a file's stat), so only the first job of a cohort hashes it.
A cache that cannot be read or written is ignored: the digest is then computed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger("hmil.digests")

MAX_ENTRIES = 256  #: oldest entries are dropped beyond this


def cache_path() -> Path:
    """`$HMIL_CACHE_DIR`, else `$XDG_CACHE_HOME/hmil`, else `~/.cache/hmil`; + sha256.json."""
    root = os.environ.get("HMIL_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(xdg) / "hmil"
    return Path(root) / "sha256.json"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file at `path`, from the cache when the file has not changed."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    key = f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    return _cached_sha256(key, str(resolved))


@functools.cache
def _cached_sha256(key: str, path: str) -> str:
    entries = _read_cache()
    digest = entries.get(key)
    if isinstance(digest, str) and len(digest) == 64:
        return digest
    digest = _sha256(path)
    entries.pop(key, None)
    entries[key] = digest
    _write_cache(dict(list(entries.items())[-MAX_ENTRIES:]))
    return digest


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _read_cache() -> dict[str, str]:
    try:
        entries = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _write_cache(entries: dict[str, str]) -> None:
    """Whole-file replace: concurrent jobs may each drop the other's new entry, never corrupt
    the file."""
    path, temp = cache_path(), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=".sha256.", suffix=".json")
        with os.fdopen(handle, "w") as stream:
            json.dump(entries, stream, indent=0)
        os.replace(temp, path)
    except OSError as err:
        log.debug("digest cache %s not written (%s)", path, err)
        if temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(temp)
