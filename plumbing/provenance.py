"""Which code made an output: package version plus the git commit when available."""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path

try:
    __version__ = metadata.version("hmil-pipeline")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"


@functools.cache
def code_version() -> str:
    """`<version>+g<commit>[.dirty]` inside a git checkout, else `<version>`."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=10"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{out.replace('-dirty', '.dirty')}" if out else __version__
