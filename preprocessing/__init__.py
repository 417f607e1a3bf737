"""Slide access, tissue segmentation, patching and synthetic slides."""

from plumbing.provenance import __version__, code_version

__all__ = ["__version__", "code_version"]
