"""Patient-grouped stratified splits: coverage, disjointness, stratification, determinism."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from hmil.data.fold_tables import load_fold_tables
from hmil.data.hierarchy import Hierarchy
from hmil.data.splits import (
    SplitError,
    _covers_classes,
    make_splits,
    patient_labels,
    patients_needed,
)
from hmil.splits import main
from plumbing.cli import run_cli

FINE = ("a1", "a2", "b1", "b2", "c1", "c2")
PATIENTS_PER_CLASS = (16, 12, 10, 9, 7, 6)  # imbalanced, 60 patients


@pytest.fixture
def six_class_hierarchy() -> Hierarchy:
    return Hierarchy.from_mapping(
        {"name": "six", "coarse": ["A", "B", "C"], "fine": {f: f[0].upper() for f in FINE}}
    )


def make_sheet(patients_per_class=PATIENTS_PER_CLASS, seed: int = 1) -> pd.DataFrame:
    """One to three slides per patient; every patient's slides share its label."""
    rng = np.random.default_rng(seed)
    rows, patient = [], 0
    for label, count in zip(FINE, patients_per_class, strict=False):
        for _ in range(count):
            for _ in range(int(rng.integers(1, 4))):
                rows.append(
                    {
                        "slide_id": f"s{len(rows):03d}",
                        "path": f"slides/s{len(rows):03d}.svs",
                        "patient_id": f"p{patient:03d}",
                        "label": label,
                    }
                )
            patient += 1
    return pd.DataFrame(rows)


@pytest.fixture
def sheet_csv(tmp_path):
    path = tmp_path / "slides.csv"
    make_sheet().to_csv(path, index=False)
    return path


@pytest.fixture
def hierarchy_yaml(tmp_path):
    path = tmp_path / "six.yaml"
    fine = "\n".join(f"  {f}: {f[0].upper()}" for f in FINE)
    path.write_text(f"name: six\ncoarse: [A, B, C]\nfine:\n{fine}\n")
    return path


def folds_of(splits: pd.DataFrame) -> list[str]:
    return [c for c in splits.columns if c.startswith("fold")]


def test_kfold_tests_cover_every_slide_once_and_patients_stay_in_one_part(six_class_hierarchy):
    sheet = make_sheet()
    splits = make_splits(sheet, folds=5, seed=0, hierarchy=six_class_hierarchy)

    assert list(splits.columns) == [
        "slide_id",
        "patient_id",
        "label",
        "coarse_label",
        *[f"fold{k}" for k in range(5)],
    ]
    assert splits["slide_id"].tolist() == sheet["slide_id"].tolist()
    assert (splits["coarse_label"] == splits["label"].str[0].str.upper()).all()
    folds = splits[folds_of(splits)]
    assert ((folds == "test").sum(axis=1) == 1).all()
    assert folds.isin(["train", "val", "test"]).all().all()
    for column in folds:
        parts_per_patient = splits.groupby("patient_id")[column].nunique()
        assert (parts_per_patient == 1).all(), column
        for part in ("train", "val", "test"):
            assert (splits[column] == part).any(), (column, part)


def test_every_class_is_in_every_part_and_test_folds_keep_class_proportions(
    six_class_hierarchy,
):
    splits = make_splits(make_sheet(), folds=5, seed=3, hierarchy=six_class_hierarchy)
    overall = splits["label"].value_counts(normalize=True)
    for column in folds_of(splits):
        for part in ("train", "val", "test"):
            assert set(splits.loc[splits[column] == part, "label"]) == set(FINE), (column, part)
        test = splits.loc[splits[column] == "test", "label"].value_counts(normalize=True)
        deviation = (test.reindex(overall.index, fill_value=0) - overall).abs().max()
        assert deviation < 0.1, (column, deviation)
        # a test fold holds about 1/K of the slides
        assert 0.12 < (splits[column] == "test").mean() < 0.28


def test_same_seed_same_bytes_other_seed_other_split(tmp_path, sheet_csv, hierarchy_yaml):
    outputs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        out = tmp_path / name / "DATA_SPLIT.csv"
        assert (
            main(
                [
                    str(sheet_csv),
                    "--folds",
                    "5",
                    "--out",
                    str(out),
                    "--seed",
                    str(seed),
                    "--hierarchy",
                    str(hierarchy_yaml),
                ]
            )
            == 0
        )
        outputs[name] = out.read_bytes()
    assert outputs["a"] == outputs["b"]
    assert outputs["a"] != outputs["c"]

    sidecar = json.loads((tmp_path / "a" / "DATA_SPLIT.json").read_text())
    assert sidecar["seed"] == 7
    assert sidecar["params"]["folds"] == 5
    assert sidecar["code_version"]
    fold0 = sidecar["counts"]["fold0"]
    table = pd.read_csv(tmp_path / "a" / "DATA_SPLIT.csv")
    assert sum(sum(part.values()) for part in fold0.values()) == len(table)
    assert fold0["test"]["a1"] == ((table["fold0"] == "test") & (table["label"] == "a1")).sum()
    # the trainer reads the file as written
    tables = load_fold_tables(tmp_path / "a" / "DATA_SPLIT.csv", 2)
    assert sum(len(t) for t in tables.values()) == len(table)


def test_repeated_protocol_gives_about_80_10_10_per_repeat(six_class_hierarchy):
    sheet = make_sheet(patients_per_class=(40, 30, 30, 30, 35, 35))  # 200 patients
    splits = make_splits(sheet, folds=3, seed=0, hierarchy=six_class_hierarchy, protocol="repeated")
    patients = splits.drop_duplicates("patient_id")
    tests = []
    for column in folds_of(splits):
        shares = patients[column].value_counts(normalize=True)
        assert shares["train"] == pytest.approx(0.8, abs=0.03)
        assert shares["val"] == pytest.approx(0.1, abs=0.03)
        assert shares["test"] == pytest.approx(0.1, abs=0.03)
        assert (splits.groupby("patient_id")[column].nunique() == 1).all()
        tests.append(set(patients.loc[patients[column] == "test", "patient_id"]))
    assert tests[0] != tests[1]  # independent repeats


def test_unknown_label_names_the_slide_and_the_known_classes(six_class_hierarchy):
    sheet = make_sheet()
    sheet.loc[4, "label"] = "zz"
    with pytest.raises(SplitError, match=r"s004 \('zz'\).*known classes: a1, a2, b1, b2"):
        make_splits(sheet, folds=5, hierarchy=six_class_hierarchy)


def test_class_with_fewer_patients_than_folds_fails_or_warns(six_class_hierarchy, caplog):
    sheet = make_sheet(patients_per_class=(16, 12, 10, 9, 7, 3))
    with pytest.raises(SplitError, match=r"'c2' has 3 patient\(s\).*need at least 5"):
        make_splits(sheet, folds=5, hierarchy=six_class_hierarchy)

    with caplog.at_level(logging.WARNING, logger="hmil.splits"):
        splits = make_splits(
            sheet, folds=5, hierarchy=six_class_hierarchy, allow_sparse_classes=True
        )
    assert "'c2' has 3 patient(s)" in caplog.text
    tests_with_c2 = [
        column
        for column in folds_of(splits)
        if ((splits[column] == "test") & (splits["label"] == "c2")).any()
    ]
    assert len(tests_with_c2) == 3  # one per patient; the other folds lack it
    assert ((splits[folds_of(splits)] == "test").sum(axis=1) == 1).all()


def test_slides_without_patient_id_are_their_own_patients(six_class_hierarchy, caplog):
    sheet = make_sheet()
    shared = sheet["patient_id"] == sheet["patient_id"].iloc[0]
    assert shared.sum() >= 2
    sheet.loc[shared, "patient_id"] = np.nan
    sheet.loc[len(sheet) - 1, "patient_id"] = ""
    with caplog.at_level(logging.WARNING, logger="hmil.splits"):
        splits = make_splits(sheet, folds=5, seed=0, hierarchy=six_class_hierarchy)
    assert f"{shared.sum() + 1} slide(s) without patient_id" in caplog.text
    orphans = splits[shared.to_numpy()]
    assert orphans["patient_id"].tolist() == orphans["slide_id"].tolist()
    assert splits["patient_id"].iloc[-1] == splits["slide_id"].iloc[-1]


def test_one_patient_per_class_is_a_clear_error(tmp_path, capsys):
    sheet = make_sheet(patients_per_class=(1, 1, 1, 1, 1, 1), seed=0)
    path = tmp_path / "tiny.csv"
    sheet.to_csv(path, index=False)
    out = tmp_path / "DATA_SPLIT.csv"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(path), "--folds", "5", "--out", str(out)])
    assert exit_info.value.code == 1
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0
    assert message.startswith(f"error: {path}: class(es) too small")
    assert "'a1' has 1 patient(s)" in message and "need at least 5" in message
    # a workflow user cannot pass the flag: the message names the config key too
    assert "--allow-sparse-classes" in message and "splits.allow_sparse_classes: true" in message
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_unknown_label_through_the_cli_is_one_line(tmp_path, hierarchy_yaml, capsys):
    sheet = make_sheet()
    sheet.loc[0, "label"] = "IC"
    path = tmp_path / "slides.csv"
    sheet.to_csv(path, index=False)
    with pytest.raises(SystemExit):
        run_cli(
            main,
            [
                str(path),
                "--folds",
                "5",
                "--out",
                str(tmp_path / "o.csv"),
                "--hierarchy",
                str(hierarchy_yaml),
            ],
        )
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0
    assert "s000 ('IC')" in message and "hierarchy 'six'" in message


@pytest.mark.parametrize(("folds", "needed"), [(2, 4), (3, 3), (5, 5), (10, 10)])
def test_patients_needed_leaves_one_train_and_one_val_patient(folds, needed):
    assert patients_needed(folds, "kfold") == needed


def test_fold_coverage_check_needs_a_test_and_two_other_patients_per_class():
    labels = np.array(["x", "x", "x", "y", "y", "y", "z"])  # z is sparse (1 < needed = 3)
    good = [np.array([0, 3]), np.array([1, 4]), np.array([2, 5, 6])]
    assert _covers_classes(labels, good, needed=3)
    missing_y = [np.array([0, 3, 4]), np.array([1]), np.array([2, 5, 6])]
    assert not _covers_classes(labels, missing_y, needed=3)


def test_patient_with_several_labels_is_stratified_by_its_majority_and_kept_together(
    six_class_hierarchy,
):
    sheet = make_sheet()
    first = sheet["patient_id"].iloc[0]
    extra = [
        {"slide_id": f"mix{i}", "path": "x.svs", "patient_id": "mixed", "label": label}
        for i, label in enumerate(["b1", "c2", "b1"])
    ]
    tie = [{"slide_id": "tie0", "path": "x.svs", "patient_id": first, "label": "c1"}]
    sheet = pd.concat([sheet, pd.DataFrame(extra + tie)], ignore_index=True)
    labels = patient_labels(sheet[["slide_id", "patient_id", "label"]])["label"]
    assert labels["mixed"] == "b1"
    assert labels[first] == "a1"  # a1 slides come first in the sheet (or outnumber c1)
    splits = make_splits(sheet, folds=5, seed=0, hierarchy=six_class_hierarchy)
    for column in [c for c in splits.columns if c.startswith("fold")]:
        assert splits.loc[splits["patient_id"] == "mixed", column].nunique() == 1


def clam_return_splits(csv_path, slide_ids: pd.Series) -> dict[str, set[str]]:
    """A re-statement of CLAM's reader, ``Generic_WSI_Classification_Dataset.return_splits(
    from_id=False, csv_path=...)`` with ``get_split_from_df``: read the csv with the slide
    ids' dtype, take each column's non-empty cells, select those slides of the dataset."""
    all_splits = pd.read_csv(csv_path, dtype=slide_ids.dtype)
    found = {}
    for key in ("train", "val", "test"):
        split = all_splits[key].dropna().reset_index(drop=True)
        found[key] = set(slide_ids[slide_ids.isin(split.tolist())])
    return found


def test_clam_layout_reads_back_as_the_same_folds(tmp_path, hierarchy_yaml):
    sheet = make_sheet()
    # Zero-padded numeric ids: the case CLAM's reader guards with dtype (they must stay text).
    sheet["slide_id"] = [f"{i:04d}" for i in range(len(sheet))]
    path = tmp_path / "slides.csv"
    sheet.to_csv(path, index=False)
    out, clam = tmp_path / "DATA_SPLIT.csv", tmp_path / "clam"
    args = [str(path), "--folds", "4", "--out", str(out), "--hierarchy", str(hierarchy_yaml)]
    assert main([*args, "--clam-dir", str(clam)]) == 0

    splits = pd.read_csv(out, dtype={"slide_id": str})
    dataset_ids = splits["slide_id"].astype(object)  # CLAM's slide_data column
    assert sorted(p.name for p in clam.iterdir()) == sorted(
        f"splits_{k}{s}.csv" for k in range(4) for s in ("", "_bool", "_descriptor")
    )
    for k in range(4):
        expected = {
            part: set(splits.loc[splits[f"fold{k}"] == part, "slide_id"])
            for part in ("train", "val", "test")
        }
        assert all(expected.values())
        lines = (clam / f"splits_{k}.csv").read_text().splitlines()
        assert lines[0] == ",train,val,test"
        assert [line.split(",")[0] for line in lines[1:]] == [
            str(i) for i in range(len(expected["train"]))
        ]  # train is the longest column; val and test are padded with empty cells
        assert clam_return_splits(clam / f"splits_{k}.csv", dataset_ids) == expected

        flags = pd.read_csv(clam / f"splits_{k}_bool.csv", index_col=0, dtype={0: str})
        assert list(flags.columns) == ["train", "val", "test"]
        assert (flags.sum(axis=1) == 1).all() and len(flags) == len(splits)
        assert {part: set(flags.index[flags[part]]) for part in flags} == expected

        descriptor = pd.read_csv(clam / f"splits_{k}_descriptor.csv", index_col=0)
        assert list(descriptor.index) == list(FINE)
        for part in ("train", "val", "test"):
            in_part = splits[splits[f"fold{k}"] == part]
            assert descriptor[part].to_dict() == {
                c: int((in_part["label"] == c).sum()) for c in FINE
            }
    assert json.loads(out.with_suffix(".json").read_text())["params"]["clam_dir"] == str(clam)

    # Without --clam-dir the DATA_SPLIT.csv is byte-identical: the CLAM copy is derived only.
    plain = tmp_path / "plain" / "DATA_SPLIT.csv"
    assert main([*args[:4], str(plain), *args[5:]]) == 0
    assert plain.read_bytes() == out.read_bytes()
