"""From whole-slide images to patch features.

The top-level modules are the commands (``python -m preprocessing.patch``, ``extract``,
``import_features``, ``synthetic``, ``summary``, ``feature_summary``); their cores are the
stage packages :mod:`preprocessing.slides` (slide access, tissue, patch grid, patches
files, synthetic slides) and :mod:`preprocessing.features` (encoders, the runner, features
files, the import of features made elsewhere).
"""

from plumbing.provenance import __version__, code_version

__all__ = ["__version__", "code_version"]
