"""Frozen config dataclasses built from YAML mappings and named presets, checked once.

Loss and MHIM settings share this: unknown keys are an error naming the source, and a
preset file is ``name: {field: value, ...}`` with unset fields at their defaults. It lives
here, below every stage, so that models (MHIM) and training (losses) both read presets
without one importing the other. A preset file is a path or a package resource
(``importlib.resources.files(...) / name``), so shipped presets work from a wheel too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

try:
    from importlib.resources.abc import Traversable
except ImportError:  # Python 3.10
    from importlib.abc import Traversable

#: A preset file: a path, or a package resource such as ``files("hmil.presets") / "x.yaml"``.
PresetFile = str | Path | Traversable

T = TypeVar("T")


def dataclass_from_mapping(cls: type[T], values: Mapping[str, Any], source: str) -> T:
    """``cls(**values)``; an unknown key is a ValueError naming ``source`` and the known keys."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"{source}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})"
        )
    return cls(**values)


def read_presets(path: PresetFile) -> dict[str, Mapping[str, Any]]:
    """The field overrides of every preset of a YAML file, as written (not yet validated)."""
    path = Path(path) if isinstance(path, str) else path
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, Mapping):
        raise ValueError(f"{path}: expected a mapping of preset name → settings")
    return {str(name): values or {} for name, values in spec.items()}


def load_presets(cls: type[T], path: PresetFile) -> dict[str, T]:
    """All presets of a YAML file (``name: {field: value, ...}``), validated."""
    return {
        name: dataclass_from_mapping(cls, values, f"{path}: preset {name!r}")
        for name, values in read_presets(path).items()
    }


def get_preset(
    cls: type[T], name: str, path: PresetFile, kind: str, base: Mapping[str, Any] | None = None
) -> T:
    """Preset ``name`` of ``path``; an unknown name is a ValueError listing the presets. The
    fields the preset does not set come from ``base`` where it has them, else the defaults."""
    presets = read_presets(path)
    if name not in presets:
        raise ValueError(f"{path}: unknown {kind} preset {name!r} (presets: {', '.join(presets)})")
    # every preset of the file is valid, not only this one
    for other, values in presets.items():
        dataclass_from_mapping(cls, values, f"{path}: preset {other!r}")
    values = {**(base or {}), **presets[name]}
    return dataclass_from_mapping(cls, values, f"{path}: preset {name!r}")


class PresetSettings:
    """Mixin of a frozen settings dataclass that presets are read into: ``from_mapping``,
    ``preset(name)`` and ``presets()``, from the shipped file unless given another."""

    PRESETS: ClassVar[PresetFile]  #: the shipped preset file
    KIND: ClassVar[str]  #: what the settings are, in messages ("loss", "MHIM")

    @classmethod
    def from_mapping(cls: type[T], values: Mapping[str, Any], source: str | None = None) -> T:
        """Build from a mapping of field overrides; unknown keys are an error."""
        return dataclass_from_mapping(cls, values, source or f"{cls.KIND} config")

    @classmethod
    def preset(
        cls: type[T],
        name: str,
        path: PresetFile | None = None,
        base: Mapping[str, Any] | None = None,
    ) -> T:
        """Preset ``name`` of ``path`` (default: the shipped file); fields it does not set:
        ``base``'s, else the defaults."""
        return get_preset(cls, name, path or cls.PRESETS, cls.KIND, base)

    @classmethod
    def presets(cls: type[T], path: PresetFile | None = None) -> dict[str, T]:
        """Every preset of ``path`` (default: the shipped file), validated."""
        return load_presets(cls, path or cls.PRESETS)
