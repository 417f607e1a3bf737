"""The HMIL authors' published split pickles: read exactly, read safely, checked against
the sheet (`python -m hmil.splits SHEET --from-hmil-pkls DIR`)."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hmil.data.fold_tables import load_fold_tables
from hmil.data.published_splits import PublishedSplitError, load_plain_pickle
from hmil.splits import main
from plumbing.cli import run_cli
from tests.hmil.published_pickles import PARTS, published_parts, write_published_pickles

BRACS = ("N", "PB", "UDH", "FEA", "ADH", "DCIS", "IC")
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def bracs_sheet(n_slides: int = 60) -> pd.DataFrame:
    """Slides of every BRACS class, two per patient."""
    return pd.DataFrame(
        {
            "slide_id": [f"BRACS_{1000 + i}" for i in range(n_slides)],
            "path": [f"slides/BRACS_{1000 + i}.svs" for i in range(n_slides)],
            "patient_id": [f"P{i // 2:03d}" for i in range(n_slides)],
            "label": [BRACS[(i // 2) % len(BRACS)] for i in range(n_slides)],
        }
    )


@pytest.fixture
def cohort(tmp_path):
    """A sheet of 60 slides and 10 published splits of it (80/10/10 of 57 listed slides:
    each split leaves 3 slides of the sheet out)."""
    sheet = bracs_sheet()
    sheet_path = tmp_path / "slides.csv"
    sheet.to_csv(sheet_path, index=False)
    parts = published_parts(sheet, splits=10, left_out=3)
    pkls = write_published_pickles(tmp_path / "BRACS", sheet, parts)
    return {"sheet": sheet, "sheet_path": sheet_path, "parts": parts, "pkls": pkls}


def split_args(cohort, out: Path, *extra: str) -> list[str]:
    return [
        str(cohort["sheet_path"]),
        "--from-hmil-pkls",
        str(cohort["pkls"]),
        "--out",
        str(out),
        "--hierarchy",
        "bracs",
        *extra,
    ]


def one_error_line(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, args)
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, lines
    return errors[0]


def test_every_slide_is_in_its_published_part_of_its_published_split(cohort, tmp_path):
    out, clam = tmp_path / "out" / "DATA_SPLIT.csv", tmp_path / "out" / "clam"
    assert main(split_args(cohort, out, "--clam-dir", str(clam))) == 0

    table = pd.read_csv(out, dtype={"slide_id": str}, keep_default_na=False)
    assert list(table.columns) == [
        "slide_id",
        "patient_id",
        "label",
        "coarse_label",
        *(f"fold{k}" for k in range(10)),
    ]
    assert table["slide_id"].tolist() == cohort["sheet"]["slide_id"].tolist()  # sheet order
    for k, published in enumerate(cohort["parts"]):
        written = {part: set(table.loc[table[f"fold{k}"] == part, "slide_id"]) for part in PARTS}
        assert written == {part: set(ids) for part, ids in published.items()}
        assert [len(published[p]) for p in PARTS] == [45, 6, 6]  # 80/10/10 of 57
        # the 3 slides this split does not list are left out of the fold: an empty cell,
        # and the trainer's reader gives exactly the published parts
        assert (table[f"fold{k}"] == "").sum() == 3
        tables = load_fold_tables(out, k)
        assert {p: set(tables[p]["slide_id"]) for p in PARTS} == written
        clam_parts = pd.read_csv(clam / f"splits_{k}.csv", dtype=str)
        assert {p: set(clam_parts[p].dropna()) for p in PARTS} == written
    assert set(table["coarse_label"]) == {"benign", "atypical", "malignant"}

    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["params"]["protocol"] == "published"
    assert sidecar["params"]["from_hmil_pkls"] == str(cohort["pkls"])
    assert sidecar["source"]["directory"] == str(cohort["pkls"].resolve())
    assert sidecar["source"]["sha256"] == {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(cohort["pkls"].iterdir())
    }
    assert len(sidecar["source"]["sha256"]) == 30
    assert sidecar["excluded"] == {f"fold{k}": 3 for k in range(10)}
    assert sidecar["code_version"] and sidecar["seed"] is None
    assert sum(sidecar["counts"]["fold4"]["val"].values()) == 6


def test_integer_labels_of_panda_pickles_match_the_sheets_class_names(tmp_path):
    sheet = pd.DataFrame(
        {
            "slide_id": [f"{i:032x}" for i in range(30)],
            "path": "x.tiff",
            "patient_id": "",
            "label": [str(i % 6) for i in range(30)],
        }
    )
    sheet.to_csv(tmp_path / "slides.csv", index=False)
    as_ints = sheet.assign(label=sheet["label"].astype(int))  # PANDA's isup_grade 0-5
    pkls = write_published_pickles(tmp_path / "PANDA", as_ints, published_parts(sheet, 2))
    out = tmp_path / "DATA_SPLIT.csv"
    args = [str(tmp_path / "slides.csv"), "--from-hmil-pkls", str(pkls), "--out", str(out)]
    assert main([*args, "--hierarchy", "panda"]) == 0
    table = pd.read_csv(out, dtype=str)
    assert table["slide_id"].tolist() == sheet["slide_id"].tolist()  # hex ids stay text
    assert (table["patient_id"] == table["slide_id"]).all()  # no patient id: its own patient


class RunsACommand:
    """Unpickling this runs `touch <marker>` (with pickle.load, not with ours)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvaluatesCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",))


def test_a_pickle_made_to_run_a_command_is_refused_and_nothing_runs(cohort, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    payload = pickle.dumps([["BRACS_1000", "N", RunsACommand(marker)]])
    # The same payload is live: an ordinary unpickler runs the command (in a child process).
    check = tmp_path / "check"
    check.mkdir()
    subprocess.run(
        [sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
        input=pickle.dumps([["BRACS_1000", "N", RunsACommand(check / "MARKER")]]),
        check=True,
    )
    assert (check / "MARKER").exists()

    target = cohort["pkls"] / "test_splits_3.pkl"
    target.write_bytes(payload)
    out = tmp_path / "DATA_SPLIT.csv"
    line = one_error_line(capsys, split_args(cohort, out))
    assert line.startswith(f"error: {target}: refused:")
    assert f"{os.system.__module__}.system" in line and "nothing was run" in line
    assert not marker.exists()
    assert not out.exists() and not out.with_suffix(".json").exists()


@pytest.mark.parametrize(
    ("row", "protocol", "named"),
    [
        (lambda marker: ["BRACS_1000", EvaluatesCode(marker), "f.pt"], 5, "builtins.eval"),
        # Python 2's names, as protocols 0-2 write them
        (lambda marker: ["BRACS_1000", EvaluatesCode(marker), "f.pt"], 2, "__builtin__.eval"),
        (lambda marker: ["BRACS_1000", "N", marker], 5, "pathlib"),  # a class instance
        (lambda marker: ["BRACS_1000", np.int64(3), "f.pt"], 5, "a numpy object, numpy"),
        (lambda marker: ["BRACS_1000", "N", {"path"}], 2, "__builtin__.set"),
    ],
)
def test_any_object_other_than_plain_data_is_refused_naming_the_file(
    cohort, tmp_path, capsys, row, protocol, named
):
    marker = tmp_path / "MARKER"
    target = cohort["pkls"] / "val_splits_0.pkl"
    target.write_bytes(pickle.dumps([row(marker)], protocol=protocol))
    line = one_error_line(capsys, split_args(cohort, tmp_path / "DATA_SPLIT.csv"))
    assert line.startswith(f"error: {target}: refused: the pickle asks for")
    assert named in line
    assert not marker.exists() and not (tmp_path / "DATA_SPLIT.csv").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (pickle.dumps({"BRACS_1000": "N"}), "not a published split: expected a list of"),
        (pickle.dumps([["BRACS_1000", "N"]]), "row 0 is ['BRACS_1000', 'N']; expected"),
        (pickle.dumps([["BRACS_1000", "N", "f.pt"], "BRACS_1001"]), "row 1 is 'BRACS_1001'"),
        (pickle.dumps([["BRACS_1000", None, "f.pt"]]), "row 0 is ['BRACS_1000', None,"),
        (pickle.dumps([["BRACS_1000", "N", "f.pt"]])[:-5], "not a readable pickle"),
        (b"slide_id,label\nBRACS_1000,N\n", "not a readable pickle"),
    ],
)
def test_a_pickle_of_another_shape_is_one_clear_line(cohort, tmp_path, capsys, content, message):
    target = cohort["pkls"] / "train_splits_7.pkl"
    target.write_bytes(content)
    line = one_error_line(capsys, split_args(cohort, tmp_path / "DATA_SPLIT.csv"))
    assert line.startswith(f"error: {target}: ")
    assert message in line
    assert not (tmp_path / "DATA_SPLIT.csv").exists()


def edit_split(cohort, k: int, part: str, edit) -> None:
    """Rewrite one published pickle with `edit(rows)`."""
    path = cohort["pkls"] / f"{part}_splits_{k}.pkl"
    rows = pickle.loads(path.read_bytes())  # written by this test: trusted
    path.write_bytes(pickle.dumps(edit(rows)))


def test_disagreements_with_the_sheet_are_counted_and_named(cohort, tmp_path, capsys):
    out = tmp_path / "DATA_SPLIT.csv"
    args = split_args(cohort, out)
    val = cohort["parts"][2]["val"]

    # a slide in two parts of one split
    edit_split(cohort, 2, "test", lambda rows: [*rows, [val[0], "N", "f.pt"]])
    line = one_error_line(capsys, args)
    assert "1 slide(s) listed more than once in one split" in line
    assert f"{val[0]} (split 2: val and test)" in line
    edit_split(cohort, 2, "test", lambda rows: rows[:-1])

    # slides in a pickle but not in the sheet: count, first five and the file
    extra = [[f"BRACS_9{i:03d}", "IC", "f.pt"] for i in range(7)]
    edit_split(cohort, 1, "train", lambda rows: rows + extra)
    line = one_error_line(capsys, args)
    assert "7 slide(s) of the published splits are not in the sheet" in line
    assert "BRACS_9000 (train_splits_1.pkl)" in line and "BRACS_9004" in line
    assert "BRACS_9005" not in line and line.endswith("and 2 more")
    edit_split(cohort, 1, "train", lambda rows: rows[:-7])

    # a label the hierarchy lacks
    edit_split(cohort, 0, "val", lambda rows: [[rows[0][0], "Benign", rows[0][2]], *rows[1:]])
    line = one_error_line(capsys, args)
    first = cohort["parts"][0]["val"][0]
    assert "1 slide(s) of the published splits have a label not in hierarchy 'bracs': " in line
    assert f"{first} ('Benign')" in line and "known classes: N, PB, UDH" in line

    # a label other than the sheet's
    sheet_label = cohort["sheet"].set_index("slide_id").loc[first, "label"]
    other = "IC" if sheet_label != "IC" else "N"
    edit_split(cohort, 0, "val", lambda rows: [[rows[0][0], other, rows[0][2]], *rows[1:]])
    line = one_error_line(capsys, args)
    assert "1 slide(s) have another label in the published splits than in the sheet" in line
    assert f"{first} ({other!r} published, {sheet_label!r} in the sheet)" in line
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_an_incomplete_folder_or_another_number_of_splits_is_one_line(cohort, tmp_path, capsys):
    out = tmp_path / "DATA_SPLIT.csv"
    line = one_error_line(capsys, split_args(cohort, out, "--folds", "5"))
    assert line.endswith(": 10 published splits, but --folds 5")
    (cohort["pkls"] / "val_splits_4.pkl").unlink()
    line = one_error_line(capsys, split_args(cohort, out))
    assert line == f"error: {cohort['pkls']}: split 4 lacks val_splits_4.pkl"
    for part in PARTS:
        (cohort["pkls"] / f"{part}_splits_4.pkl").unlink(missing_ok=True)
    line = one_error_line(capsys, split_args(cohort, out))
    assert "numbered 0…9 but split(s) 4 are missing" in line
    line = one_error_line(
        capsys, [*split_args(cohort, out)[:2], str(tmp_path / "nowhere"), "--out", str(out)]
    )
    assert "nowhere: folder of published splits not found" in line
    assert not out.exists()


def test_plain_data_loads_as_it_was_pickled_in_every_protocol():
    rows = [["a", "N", "/f/a.pt"], ("b", 3, "/f/b.pt"), ["c", 2.0, ""]]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert load_plain_pickle(pickle.dumps(rows, protocol), "x.pkl") == rows
    with pytest.raises(PublishedSplitError, match=r"x\.pkl: refused.*collections\.OrderedDict"):
        from collections import OrderedDict

        load_plain_pickle(pickle.dumps(OrderedDict(a=1)), "x.pkl")
    # a copyreg extension code (EXT1 1) and an out-of-band buffer (NEXT_BUFFER): unreadable
    for opcodes in (b"\x80\x02]\x82\x01a.", b"\x80\x05\x97."):
        with pytest.raises(PublishedSplitError, match=r"x\.pkl: not a readable pickle"):
            load_plain_pickle(opcodes, "x.pkl")
