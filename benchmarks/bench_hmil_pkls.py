"""Reading the HMIL authors' published splits at PANDA's size, seconds.

    python benchmarks/bench_hmil_pkls.py [--slides 10616] [--listed 10202] [--splits 10]
        [--repeats 3] [--keep DIR]

Generates a PANDA-shaped cohort (32-hex-digit slide ids, ISUP labels 0-5 as integers, each
slide its own patient) and 10 split pickles of 8,164/1,019/1,019 slides as the authors
publish them (``{train,val,test}_splits_{k}.pkl``, rows ``[slide_id, label, feature_path]``),
then times, per repeat:

- ``read``: reading and checking the 30 pickles (plain-data unpickler, shape, slides listed
  twice) — :func:`hmil.data.published_splits.read_published_splits`;
- ``command``: the whole ``python -m hmil.splits SHEET --from-hmil-pkls DIR --out
  DATA_SPLIT.csv --hierarchy panda --clam-dir DIR`` in this process (sheet, checks against
  sheet and hierarchy, DATA_SPLIT.csv + .json + CLAM's 30 tables, atomically).

It then checks the written DATA_SPLIT.csv against the pickles: every listed slide in the
same part of the same split, every other slide left out (exit 1 if not).
"""

from __future__ import annotations

import argparse
import logging
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from hmil.data.published_splits import read_published_splits
from hmil.splits import main as splits_main


def write_panda_like(root: Path, n_slides: int, listed: int, splits: int) -> dict:
    rng = np.random.default_rng(0)
    ids = np.array([f"{x:032x}" for x in rng.integers(0, 2**63, n_slides)])
    labels = rng.integers(0, 6, n_slides)
    sheet = pd.DataFrame(
        {"slide_id": ids, "path": [f"{i}.tiff" for i in ids], "patient_id": ids, "label": labels}
    )
    sheet.to_csv(root / "slides.csv", index=False)
    label_of = dict(zip(ids, labels.tolist(), strict=True))
    n_small = round(0.0999 * listed)  # PANDA: 8,164 / 1,019 / 1,019 of 10,202
    published = []
    (root / "PANDA").mkdir()
    for k in range(splits):
        order = np.random.default_rng([1, k]).permutation(ids)[:listed].tolist()
        n_train = listed - 2 * n_small
        parts = {
            "train": order[:n_train],
            "val": order[n_train : n_train + n_small],
            "test": order[n_train + n_small :],
        }
        for part, slides in parts.items():
            rows = [[s, label_of[s], f"/data/PANDA/features/{s}.pt"] for s in slides]
            (root / "PANDA" / f"{part}_splits_{k}.pkl").write_bytes(pickle.dumps(rows))
        published.append(parts)
    return {"sheet": root / "slides.csv", "pkls": root / "PANDA", "published": published}


def check_exact(out: Path, published: list[dict]) -> int:
    """Slides whose part in DATA_SPLIT.csv differs from the pickles' (0 = exact)."""
    table = pd.read_csv(out, dtype=str, keep_default_na=False).set_index("slide_id")
    wrong = 0
    for k, parts in enumerate(published):
        expected = pd.Series("", index=table.index)
        for part, slides in parts.items():
            expected[slides] = part
        wrong += int((table[f"fold{k}"] != expected).sum())
    return wrong


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=10616, help="slides in the sheet")
    parser.add_argument("--listed", type=int, default=10202, help="slides per split")
    parser.add_argument("--splits", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="work here instead of a temporary folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the per-fold counts table is not timed output

    with tempfile.TemporaryDirectory() as temporary:
        root = args.keep or Path(temporary)
        root.mkdir(parents=True, exist_ok=True)
        cohort = write_panda_like(root, args.slides, args.listed, args.splits)
        out = root / "out" / "DATA_SPLIT.csv"
        command = [
            str(cohort["sheet"]),
            "--from-hmil-pkls",
            str(cohort["pkls"]),
            "--out",
            str(out),
            "--hierarchy",
            "panda",
            "--clam-dir",
            str(root / "out" / "clam"),
        ]
        timings: dict[str, list[float]] = {"read": [], "command": []}
        for _ in range(args.repeats):
            start = time.perf_counter()
            read_published_splits(cohort["pkls"])
            timings["read"].append(time.perf_counter() - start)
            start = time.perf_counter()
            splits_main(command)
            timings["command"].append(time.perf_counter() - start)
        wrong = check_exact(out, cohort["published"])
        rows = args.splits * args.listed
        print(
            f"{args.splits} splits x {args.listed} rows ({rows} rows, {3 * args.splits} "
            f"pickles), sheet of {args.slides} slides"
        )
        for name, seconds in timings.items():
            print(
                f"{name:8s} median {statistics.median(seconds):.2f} s, "
                f"min {min(seconds):.2f} s over {args.repeats}"
            )
        print(f"slides in another part than published: {wrong}")
        return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
