"""The two-level label hierarchy: fine classes, coarse classes and the map between them.

A hierarchy file is YAML with an ordered list of coarse class names and an ordered
mapping from each fine class name to its coarse class::

    name: bracs
    coarse: [benign, atypical, malignant]
    fine:             # ordered; value = coarse class
      N: benign
      PB: benign
      ...

The order of the names fixes the class indices used by every model, loss, table and
probability column, so it is part of the contract. Class names are strings; integer
names (PANDA's ISUP grades) are read as their decimal string, so ``"3"`` and ``3`` are
the same label.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from plumbing.presets import Traversable

#: The shipped presets (package data, found in a wheel as in a checkout).
PRESET_DIR = resources.files("hmil.presets") / "hierarchies"


class HierarchyError(ValueError):
    """A hierarchy file or a label that does not fit the hierarchy."""


@dataclass(frozen=True)
class Hierarchy:
    """Fine classes, coarse classes and the coarse class of each fine class.

    Attributes:
        name: short name of the hierarchy (e.g. ``bracs``).
        fine: ordered fine class names; index f is fine class f.
        coarse: ordered coarse class names; index c is coarse class c.
        coarse_of_fine: for each fine class, the index of its coarse class.
        source: where the hierarchy came from (a file path), used in error messages.
    """

    name: str
    fine: tuple[str, ...]
    coarse: tuple[str, ...]
    coarse_of_fine: tuple[int, ...]
    source: str = field(default="<hierarchy>", compare=False)

    def __post_init__(self) -> None:
        where = self.source
        if len(set(self.coarse)) != len(self.coarse):
            raise HierarchyError(
                f"{where}: duplicate coarse class {_first_duplicate(self.coarse)!r}"
            )
        if len(set(self.fine)) != len(self.fine):
            raise HierarchyError(f"{where}: duplicate fine class {_first_duplicate(self.fine)!r}")
        if len(self.fine) < 2:
            raise HierarchyError(f"{where}: needs at least 2 fine classes, got {len(self.fine)}")
        if len(self.coarse_of_fine) != len(self.fine):
            raise HierarchyError(
                f"{where}: {len(self.fine)} fine classes but "
                f"{len(self.coarse_of_fine)} coarse indices"
            )
        for fine_name, coarse_index in zip(self.fine, self.coarse_of_fine, strict=True):
            if not 0 <= coarse_index < len(self.coarse):
                raise HierarchyError(
                    f"{where}: fine class {fine_name!r} maps to coarse index {coarse_index}, "
                    f"outside 0..{len(self.coarse) - 1}"
                )
        empty = [c for i, c in enumerate(self.coarse) if i not in self.coarse_of_fine]
        if empty:
            raise HierarchyError(f"{where}: coarse class {empty[0]!r} has no fine class")

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any], source: str = "<hierarchy>") -> Hierarchy:
        """Build from the parsed YAML layout (``name``, ``coarse`` list, ``fine`` mapping)."""
        if not isinstance(spec, Mapping):
            raise HierarchyError(f"{source}: expected a mapping with keys name, coarse, fine")
        missing = [key for key in ("coarse", "fine") if key not in spec]
        if missing:
            raise HierarchyError(f"{source}: missing key {missing[0]!r} (need coarse and fine)")
        coarse_spec, fine_spec = spec["coarse"], spec["fine"]
        if not isinstance(coarse_spec, list):
            raise HierarchyError(f"{source}: 'coarse' must be a list of class names")
        if not isinstance(fine_spec, Mapping):
            raise HierarchyError(f"{source}: 'fine' must map each fine class to its coarse class")
        coarse = tuple(_class_name(c, source) for c in coarse_spec)
        fine = tuple(_class_name(f, source) for f in fine_spec)
        coarse_index = {c: i for i, c in enumerate(coarse)}
        coarse_of_fine = []
        for fine_name, coarse_name in zip(fine, fine_spec.values(), strict=True):
            if isinstance(coarse_name, list | Mapping):
                raise HierarchyError(
                    f"{source}: fine class {fine_name!r} must map to exactly one coarse class, "
                    f"got {coarse_name!r}"
                )
            coarse_name = _class_name(coarse_name, source)
            if coarse_name not in coarse_index:
                raise HierarchyError(
                    f"{source}: fine class {fine_name!r} maps to unknown coarse class "
                    f"{coarse_name!r} (coarse classes: {', '.join(coarse)})"
                )
            coarse_of_fine.append(coarse_index[coarse_name])
        name = str(spec.get("name", Path(source).stem))
        return cls(name, fine, coarse, tuple(coarse_of_fine), source=source)

    @classmethod
    def from_yaml(cls, path: str | Path | Traversable) -> Hierarchy:
        """Load and validate a hierarchy YAML file; raises HierarchyError naming the file."""
        path = Path(path) if isinstance(path, str) else path
        try:
            text = path.read_text()
        except OSError as error:
            raise HierarchyError(f"{path}: cannot read hierarchy file ({error.strerror})") from None
        try:
            spec = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
        except _DuplicateKey as duplicate:
            raise HierarchyError(
                f"{path}: line {duplicate.line}: duplicate name {duplicate.key!r}"
            ) from None
        except yaml.YAMLError as error:
            raise HierarchyError(f"{path}: not valid YAML ({error})") from None
        return cls.from_mapping(spec, source=str(path))

    @classmethod
    def preset(cls, name: str) -> Hierarchy:
        """Load a shipped preset (``bracs``, ``panda``, ``ccc``) from hmil/presets/hierarchies/."""
        path = PRESET_DIR / f"{name}.yaml"
        if not path.is_file():
            known = sorted(
                p.name.removesuffix(".yaml")
                for p in PRESET_DIR.iterdir()
                if p.name.endswith(".yaml")
            )
            raise HierarchyError(f"unknown hierarchy preset {name!r} (presets: {', '.join(known)})")
        return cls.from_yaml(path)

    # ---- lookups --------------------------------------------------------------------------

    @property
    def num_fine(self) -> int:
        return len(self.fine)

    @property
    def num_coarse(self) -> int:
        return len(self.coarse)

    @property
    def fine_to_coarse(self) -> np.ndarray:
        """int64 [C_f]: the coarse class index of each fine class."""
        return np.asarray(self.coarse_of_fine, dtype=np.int64)

    @property
    def membership_matrix(self) -> np.ndarray:
        """float32 [C_f, C_c] 0/1 matrix M with M[f, m(f)] = 1.

        Fine probabilities p [.., C_f] give coarse probabilities as p @ M; fine attention
        rows A_f [C_f, N] give coarse-level attention as Mᵀ A_f.
        """
        matrix = np.zeros((self.num_fine, self.num_coarse), dtype=np.float32)
        matrix[np.arange(self.num_fine), self.fine_to_coarse] = 1.0
        return matrix

    def membership_tensor(self, device: Any = None):
        """M as a float32 torch tensor [C_f, C_c] on ``device``."""
        import torch  # local import: loading a hierarchy must not require torch

        return torch.as_tensor(self.membership_matrix, device=device)

    def fine_index(self, label: object) -> int:
        """Index of a fine class name; HierarchyError listing the classes if unknown."""
        return self._index(label, self.fine, "fine")

    def coarse_index(self, label: object) -> int:
        """Index of a coarse class name; HierarchyError listing the classes if unknown."""
        return self._index(label, self.coarse, "coarse")

    def _index(self, label: object, names: tuple[str, ...] | list[str], level: str) -> int:
        name = label_name(label)
        try:
            return names.index(name)
        except ValueError:
            raise HierarchyError(
                f"unknown {level} label {name!r} for hierarchy {self.name!r} "
                f"(expected one of: {', '.join(names)})"
            ) from None

    def coarse_of(self, label: object) -> str:
        """Coarse class name of a fine class name."""
        return self.coarse[self.coarse_of_fine[self.fine_index(label)]]

    def check_labels(self, labels: Iterable[object]) -> None:
        """Raise HierarchyError for the first label that is not a fine class."""
        for label in labels:
            self.fine_index(label)


def label_name(label: object) -> str:
    """A label as a class name: ``3``, ``3.0`` (pandas reads int columns with gaps as float)
    and ``"3"`` all become ``"3"``; strings are stripped."""
    if isinstance(label, float | np.floating) and float(label).is_integer():
        return str(int(label))
    return str(label).strip()


# ---- YAML helpers ------------------------------------------------------------------------


def _class_name(value: object, source: str) -> str:
    # YAML turns `yes`, `no`, `on`, `null` into non-strings; a class name like that is a typo
    # waiting to happen, so ask for quotes instead of guessing.
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise HierarchyError(f"{source}: class name {value!r} is not a string; quote it in YAML")
    name = str(value).strip()
    if not name:
        raise HierarchyError(f"{source}: empty class name")
    return name


def _first_duplicate(names: Iterable[str]) -> str:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    raise AssertionError("no duplicate")


class _DuplicateKey(Exception):
    def __init__(self, key: object, line: int) -> None:
        super().__init__(key, line)
        self.key = key
        self.line = line


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses repeated mapping keys (plain YAML keeps the last one silently)."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    keys = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in keys:
            raise _DuplicateKey(key, key_node.start_mark.line + 1)
        keys.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def hierarchy_as_dict(hierarchy: Hierarchy) -> dict[str, Any]:
    """The YAML layout of a hierarchy (``Hierarchy.from_mapping`` reads it back)."""
    return {
        "name": hierarchy.name,
        "coarse": list(hierarchy.coarse),
        "fine": {fine: hierarchy.coarse_of(fine) for fine in hierarchy.fine},
    }


def load_hierarchy(spec: str | Path) -> Hierarchy:
    """A hierarchy from a YAML path, or a preset name (``bracs``, ``panda``, ``ccc``)."""
    spec = str(spec)
    if spec.endswith((".yaml", ".yml")) or Path(spec).exists():
        return Hierarchy.from_yaml(spec)
    return Hierarchy.preset(spec)
