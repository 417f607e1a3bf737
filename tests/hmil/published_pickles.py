"""Split pickles in the HMIL authors' published shape, written by the tests.

The authors publish ``{train,val,test}_splits_{k}.pkl`` for k = 0..9 (``src/datasets/
{BRACS,PANDA,CCC}/``): each a list of ``[slide_id, fine_label, feature_path]`` rows, about
80/10/10 of the slides per split (BRACS 437/54/54, PANDA 8,164/1,019/1,019).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd

PARTS = ("train", "val", "test")


def published_parts(
    slides: pd.DataFrame, splits: int = 10, seed: int = 0, left_out: int = 0
) -> list[dict[str, list[str]]]:
    """Per split, the slide ids of each part: a random 80/10/10 of ``slides`` (columns
    ``slide_id, label``) less ``left_out`` random slides that the split does not list."""
    ids = slides["slide_id"].astype(str).to_numpy()
    found = []
    for k in range(splits):
        order = np.random.default_rng([seed, k]).permutation(ids)
        listed = order[left_out:]
        n_val = n_test = max(1, round(0.1 * len(listed)))
        found.append(
            {
                "train": list(listed[: len(listed) - n_val - n_test]),
                "val": list(listed[len(listed) - n_val - n_test : len(listed) - n_test]),
                "test": list(listed[len(listed) - n_test :]),
            }
        )
    return found


def write_published_pickles(
    directory: Path,
    slides: pd.DataFrame,
    parts: list[dict[str, list[str]]],
    features: str = "/data/features",
    protocol: int = pickle.HIGHEST_PROTOCOL,
) -> Path:
    """``{part}_splits_{k}.pkl`` in ``directory``: rows ``[slide_id, label, feature_path]``
    with the labels of ``slides``, as the authors' pickles hold them."""
    directory.mkdir(parents=True, exist_ok=True)
    label_of = dict(zip(slides["slide_id"].astype(str), slides["label"], strict=True))
    for k, split in enumerate(parts):
        for part in PARTS:
            rows = [[s, label_of[s], f"{features}/{s}.pt"] for s in split[part]]
            (directory / f"{part}_splits_{k}.pkl").write_bytes(pickle.dumps(rows, protocol))
    return directory
