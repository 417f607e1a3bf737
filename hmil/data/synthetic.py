"""A generated hierarchical MIL benchmark: bags whose fine class shows in a few instances.

Each bag has N instances of dimension D drawn from N(0, noise²·I). A small fraction of
them (the *key* instances, 2–10 % by default, at least one) are shifted to the mean of the
bag's fine class. Fine class means sit close to their coarse class's direction:

    mean_f = signal · normalise(u_{m(f)} + fine_offset · v_f)

with u (one per coarse class) and v (one per fine class) orthonormal directions. So the
coarse class is the easy question and fine classes of one coarse group differ subtly
(cosine 1/(1 + fine_offset²) between their means), as in real fine-grained slides.

Real cohorts differ from this in two ways that the generator can add: class proportions
(``bags_per_class`` per class, e.g. BRACS's or PANDA's) and a slide-level shift
(``slide_shift``): one offset shared by every instance of a slide, as stain, scanner and
site give, of norm ``slide_shift · signal`` in a random direction. The offsets come from
a stream of their own, so a cohort with a shift is the same cohort plus the offsets.

The result is deterministic given the seed, and can be written as a features directory
(``<slide_id>.h5`` with ``features``/``coords``) plus a slide table, for end-to-end tests
of training and evaluation without slides or encoders.

    python -m hmil.synthetic_features --hierarchy hmil/presets/hierarchies/bracs.yaml --out DIR
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from hmil.data.hierarchy import Hierarchy

PATCH_SPACING = 256  # level-0 pixels between the fake patch positions written as coords


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and difficulty of a synthetic cohort.

    Attributes:
        bags_per_class: bags (slides) per fine class: one count for every class, or one
            per class in hierarchy order (real class proportions).
        feature_dim: D.
        min_instances, max_instances: bag size N is uniform in this inclusive range.
        min_key_fraction, max_key_fraction: fraction of key instances per bag, uniform.
        signal: distance of the key-instance mean from the origin (in noise std units).
        fine_offset: how far fine class means stray from their coarse direction.
        noise: std of every feature.
        slides_per_patient: consecutive slides of one class share a patient id.
        slide_shift: norm of each slide's shared offset, as a fraction of ``signal``.
        seed: seed of the generator; same seed, same cohort.
    """

    bags_per_class: int | tuple[int, ...] = 8
    feature_dim: int = 64
    min_instances: int = 50
    max_instances: int = 200
    min_key_fraction: float = 0.02
    max_key_fraction: float = 0.10
    signal: float = 4.0
    fine_offset: float = 0.3
    noise: float = 1.0
    slides_per_patient: int = 1
    slide_shift: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        counts = np.atleast_1d(self.bags_per_class)
        if counts.min() < 1 or self.feature_dim < 1 or self.slides_per_patient < 1:
            raise ValueError("bags_per_class, feature_dim and slides_per_patient must be ≥ 1")
        if self.slide_shift < 0:
            raise ValueError("slide_shift must be ≥ 0")
        if not 1 <= self.min_instances <= self.max_instances:
            raise ValueError("need 1 ≤ min_instances ≤ max_instances")
        if not 0 < self.min_key_fraction <= self.max_key_fraction <= 1:
            raise ValueError("need 0 < min_key_fraction ≤ max_key_fraction ≤ 1")


@dataclass(frozen=True)
class SyntheticCohort:
    """A generated cohort.

    Attributes:
        features: one float32 array [N_b, D] per bag, in table order.
        key_instances: one bool array [N_b] per bag: True where the class signal is.
        table: one row per bag: slide_id, patient_id, label (fine class name),
            coarse_label (coarse class name).
        class_means: float32 [C_f, D] mean of the key instances of each fine class.
    """

    features: list[np.ndarray]
    key_instances: list[np.ndarray]
    table: pd.DataFrame
    class_means: np.ndarray


def class_means(
    hierarchy: Hierarchy, config: SyntheticConfig, rng: np.random.Generator
) -> np.ndarray:
    """float32 [C_f, D]: signal · normalise(coarse direction + fine_offset · fine direction)."""
    num_directions = hierarchy.num_coarse + hierarchy.num_fine
    gaussian = rng.standard_normal((config.feature_dim, num_directions))
    if config.feature_dim >= num_directions:
        directions = np.linalg.qr(gaussian)[0].T  # orthonormal rows
    else:  # too few dimensions for orthogonality: random unit vectors are the best we can do
        directions = (gaussian / np.linalg.norm(gaussian, axis=0)).T
    coarse_directions = directions[: hierarchy.num_coarse]
    fine_directions = directions[hierarchy.num_coarse :]
    means = coarse_directions[hierarchy.fine_to_coarse] + config.fine_offset * fine_directions
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    return (config.signal * means).astype(np.float32)


def class_counts(hierarchy: Hierarchy, config: SyntheticConfig) -> np.ndarray:
    """int [C_f]: bags of each fine class."""
    if np.ndim(config.bags_per_class) and len(config.bags_per_class) != hierarchy.num_fine:
        raise ValueError(
            f"bags_per_class has {len(config.bags_per_class)} counts for "
            f"{hierarchy.num_fine} fine classes"
        )
    return np.broadcast_to(np.asarray(config.bags_per_class, dtype=int), hierarchy.num_fine).copy()


def generate_cohort(hierarchy: Hierarchy, config: SyntheticConfig | None = None) -> SyntheticCohort:
    """Generate ``bags_per_class`` bags for every fine class, in a seeded random order."""
    config = config or SyntheticConfig()
    rng = np.random.default_rng(config.seed)
    means = class_means(hierarchy, config, rng)
    counts = class_counts(hierarchy, config)

    fine_of_bag = np.repeat(np.arange(hierarchy.num_fine), counts)
    # Patients are numbered inside each class before shuffling, so a patient's slides
    # always share one label (as the patient-grouped splits expect).
    patients_per_class = -(-counts // config.slides_per_patient)
    first_patient = np.concatenate([[0], np.cumsum(patients_per_class)[:-1]])
    patient_of_bag = np.concatenate(
        [
            np.arange(count) // config.slides_per_patient + first
            for count, first in zip(counts, first_patient, strict=True)
        ]
    )
    order = rng.permutation(len(fine_of_bag))
    shifts = slide_shifts(config, len(order))

    features, key_instances, rows = [], [], []
    for position, bag in enumerate(order):
        fine = int(fine_of_bag[bag])
        num_instances = int(rng.integers(config.min_instances, config.max_instances + 1))
        key_fraction = rng.uniform(config.min_key_fraction, config.max_key_fraction)
        num_key = min(num_instances, max(1, round(key_fraction * num_instances)))
        is_key = np.zeros(num_instances, dtype=bool)
        is_key[rng.choice(num_instances, size=num_key, replace=False)] = True
        bag_features = config.noise * rng.standard_normal((num_instances, config.feature_dim))
        bag_features[is_key] += means[fine]
        bag_features += shifts[position]
        features.append(bag_features.astype(np.float32))
        key_instances.append(is_key)
        rows.append(
            {
                "slide_id": f"synthetic_{position:04d}",
                "patient_id": f"patient_{int(patient_of_bag[bag]):04d}",
                "label": hierarchy.fine[fine],
                "coarse_label": hierarchy.coarse[hierarchy.coarse_of_fine[fine]],
            }
        )
    return SyntheticCohort(features, key_instances, pd.DataFrame(rows), means)


def slide_shifts(config: SyntheticConfig, num_bags: int) -> np.ndarray:
    """float [num_bags, D]: each slide's offset, norm slide_shift · signal, random direction
    (zeros without a shift); a generator of its own keeps the cohort's other draws."""
    if config.slide_shift == 0:
        return np.zeros((num_bags, config.feature_dim))
    rng = np.random.default_rng([config.seed, 1])
    directions = rng.standard_normal((num_bags, config.feature_dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return config.slide_shift * config.signal * directions


def patch_coords(num_instances: int) -> np.ndarray:
    """int64 [N, 2] (x, y) of a square grid of fake patches, top-left corners, level 0."""
    width = math.ceil(math.sqrt(num_instances))
    index = np.arange(num_instances)
    return np.stack([index % width, index // width], axis=1).astype(np.int64) * PATCH_SPACING


def write_cohort(
    cohort: SyntheticCohort,
    features_dir: str | Path,
    table_path: str | Path | None = None,
    encoder: str = "synthetic",
) -> Path:
    """Write ``<features_dir>/<slide_id>.h5`` per bag and the slide table (CSV).

    Each h5 has datasets ``features`` (float32 N×D) and ``coords`` (int64 N×2) and
    attributes ``encoder``, ``feature_dim``, ``weights`` ("synthetic"). Files are written
    under a temporary name and renamed, so a crash leaves no half-written file.
    Returns the table path (default ``<features_dir>/slides.csv``).
    """
    features_dir = Path(features_dir)
    features_dir.mkdir(parents=True, exist_ok=True)
    for slide_id, bag_features in zip(cohort.table["slide_id"], cohort.features, strict=True):
        path = features_dir / f"{slide_id}.h5"
        temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        with h5py.File(temporary, "w") as file:
            file.create_dataset("features", data=bag_features)
            file.create_dataset("coords", data=patch_coords(len(bag_features)))
            file.attrs["encoder"] = encoder
            file.attrs["feature_dim"] = bag_features.shape[1]
            file.attrs["weights"] = "synthetic"
        os.replace(temporary, path)
    table_path = Path(table_path) if table_path is not None else features_dir / "slides.csv"
    temporary = table_path.with_name(f"{table_path.name}.tmp-{os.getpid()}")
    cohort.table.to_csv(temporary, index=False)
    os.replace(temporary, table_path)
    return table_path
