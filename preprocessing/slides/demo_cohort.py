"""The labelled demo cohort: synthetic slides whose classes differ in how they look.

Slides of `DEMO_CLASSES` (a two-level hierarchy) with random tissue layouts, their slide
sheet and their hierarchy file: enough for the whole workflow to run and learn something
without a single real slide.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from tqdm import tqdm

from preprocessing.slides.synthetic import Ellipse, SlideSpec, Stain, write_slide

#: Demo classes: fine label → (coarse label, stain). Coarse groups differ in nucleus
#: density; fine classes inside a group differ more subtly in colour and nucleus size.
DEMO_CLASSES: dict[str, tuple[str, Stain]] = {
    "normal": ("benign", Stain((225, 160, 195), (100, 70, 150), 0.25, 3.0)),
    "hyperplasia": ("benign", Stain((215, 150, 195), (100, 65, 155), 0.35, 3.5)),
    "atypia_low": ("atypical", Stain((222, 150, 190), (95, 60, 150), 0.50, 3.5)),
    "atypia_high": ("atypical", Stain((212, 140, 195), (85, 50, 150), 0.60, 4.0)),
    "in_situ": ("malignant", Stain((215, 140, 190), (80, 45, 145), 0.75, 4.5)),
    "invasive": ("malignant", Stain((205, 130, 190), (70, 40, 140), 0.85, 5.0)),
}


def random_regions(rng: np.random.Generator, w_um: float, h_um: float) -> tuple[Ellipse, ...]:
    """One to three tissue ellipses wholly inside the slide, sometimes with a hole."""
    regions = []
    for _ in range(int(rng.integers(1, 4))):
        radius = rng.uniform(0.15, 0.28) * min(w_um, h_um)
        rx, ry = radius, radius * rng.uniform(0.5, 1.0)
        # The ellipse is rotated: keep its enclosing circle (radius rx) inside the slide.
        cx = rng.uniform(rx + 0.02 * w_um, w_um - rx - 0.02 * w_um)
        cy = rng.uniform(rx + 0.02 * h_um, h_um - rx - 0.02 * h_um)
        angle = float(rng.uniform(0, 180))
        regions.append(Ellipse(cx, cy, rx, ry, angle_deg=angle))
        if rng.random() < 0.3:
            regions.append(Ellipse(cx, cy, rx * 0.3, ry * 0.3, angle_deg=angle, hole=True))
    return tuple(regions)


def demo_hierarchy() -> dict:
    """The hierarchy of `DEMO_CLASSES` in the YAML layout of `hmil/presets/hierarchies/`."""
    return {
        "name": "demo",
        "coarse": list(dict.fromkeys(coarse for coarse, _ in DEMO_CLASSES.values())),
        "fine": {fine: coarse for fine, (coarse, _) in DEMO_CLASSES.items()},
    }


def patient_numbers(n_rounds: int, slides_per_patient: tuple[int, ...]) -> list[int]:
    """Patient number of each round of a class: patients take `slides_per_patient` slides
    in turn, e.g. (2, 1) → 0, 0, 1, 2, 2, 3, ..."""
    numbers: list[int] = []
    patient = 0
    while len(numbers) < n_rounds:
        numbers.extend([patient] * slides_per_patient[patient % len(slides_per_patient)])
        patient += 1
    return numbers[:n_rounds]


def write_cohort(
    outdir: str | Path,
    n_slides: int = 8,
    width: int = 6000,
    height: int = 4000,
    mpp: float = 0.5,
    seed: int = 0,
    slides_per_patient: tuple[int, ...] = (2, 1),
    prefix: str = "slide",
) -> Path:
    """Write `n_slides` synthetic slides, the slide sheet `slides.csv` and the class
    hierarchy `hierarchy.yaml`; return the sheet path. Slide ids are `<prefix>_000`, ...;
    patient ids start with the prefix's first letter, upper case.

    Labels cycle through `DEMO_CLASSES`; patients of a class take `slides_per_patient`
    consecutive slides in turn, so patient-grouped splits have something to group.
    Slides that already exist are not rewritten.
    """
    outdir = Path(outdir)
    (outdir / "slides").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    fine_labels = list(DEMO_CLASSES)
    patients = patient_numbers(-(-n_slides // len(fine_labels)), tuple(slides_per_patient))
    rows = []
    for index in tqdm(range(n_slides), desc="demo cohort", unit="slide"):
        label = fine_labels[index % len(fine_labels)]
        round_ = index // len(fine_labels)
        patient = f"{prefix[0].upper()}{index % len(fine_labels):02d}{patients[round_]:03d}"
        slide_id = f"{prefix}_{index:03d}"
        spec = SlideSpec(
            width=width,
            height=height,
            mpp=mpp,
            regions=random_regions(rng, width * mpp, height * mpp),
            stain=DEMO_CLASSES[label][1],
            seed=seed * 1000 + index,
        )
        path = outdir / "slides" / f"{slide_id}.tiff"
        if not path.exists():
            write_slide(path, spec)
        rows.append(
            {
                "slide_id": slide_id,
                "path": f"slides/{slide_id}.tiff",
                "patient_id": patient,
                "label": label,
            }
        )
    sheet = outdir / "slides.csv"
    pd.DataFrame(rows).to_csv(sheet, index=False)
    (outdir / "hierarchy.yaml").write_text(yaml.safe_dump(demo_hierarchy(), sort_keys=False))
    return sheet


@dataclass(frozen=True)
class DemoCohort:
    """The demo: a training cohort and, in `<outdir>/external/`, a deployment cohort drawn
    independently (its own seed, one slide per patient)."""

    outdir: Path
    slides: int
    width: int
    height: int
    mpp: float
    seed: int
    external: int  #: slides of the deployment cohort; 0: none


def write_demo(demo: DemoCohort) -> Iterator[str]:
    """Write the demo's cohorts, yielding a line as each is done."""
    sheet = write_cohort(demo.outdir, demo.slides, demo.width, demo.height, demo.mpp, demo.seed)
    yield f"wrote {demo.slides} slides and {sheet}"
    if demo.external:
        external = write_cohort(
            demo.outdir / "external", demo.external, demo.width, demo.height, demo.mpp,
            seed=demo.seed + 1, slides_per_patient=(1,), prefix="external",
        )  # fmt: skip
        yield f"wrote {demo.external} slides of the deployment cohort and {external}"
