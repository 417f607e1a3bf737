"""Reading model checkpoints without running code from them.

A ``torch.load`` with ``weights_only=False`` unpickles anything, so a model.pt made to run a
command runs it when loaded. Every checkpoint a user can hand to a command (a fold model
to deploy, an MHIM teacher) is read with :func:`load_checkpoint`: tensors, dicts, lists,
strings and numbers only (torch's ``weights_only=True``), the rest refused before it runs.
"""

from __future__ import annotations

import os
from typing import Any

from plumbing.errors import PipelineError


class UnreadableCheckpoint(PipelineError):
    """A checkpoint that cannot be read or holds objects other than tensors and plain data.
    The message is one line without the path (the caller names the file)."""


def load_checkpoint(path: str | os.PathLike) -> Any:
    """The checkpoint at ``path`` on the CPU, if made of tensors and plain data only."""
    import torch  # here: plumbing is imported by commands that never touch torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, foreign, damaged or unsafe: all unreadable
        raise UnreadableCheckpoint(checkpoint_problem(error)) from None


def checkpoint_problem(error: Exception) -> str:
    """One line for a checkpoint ``torch.load`` refused or could not read."""
    text = str(error)
    if "Weights only load failed" in text:
        return (
            "refused: it holds objects other than tensors and plain data "
            "(not loaded, nothing in it was run)"
        )
    return (text.strip().splitlines() or [type(error).__name__])[0]
