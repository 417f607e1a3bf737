"""Features made elsewhere: CLAM, TRIDENT and bare `.pt` cohorts imported as thin features
files train and evaluate to exactly what the project's own features give; bad folders and
bad slides are one clear line or a recorded failure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from hmil.data.bags import BagError, flagged_reason, load_bag_features, read_bag_shape
from hmil.data.synthetic import SyntheticConfig
from hmil.evaluate import main as evaluate_main
from hmil.train import main as train_main
from preprocessing.features.import_checks import patch_geometry
from preprocessing.features.importing import import_cohort
from preprocessing.import_features import main
from tests.hmil import train_cli
from tests.hmil.train_cli import write_fold_cohort
from tests.preprocessing.feature_layouts import (
    PATCH_SIZE,
    write_clam,
    write_pt,
    write_sheet,
    write_trident,
)

ROOT = Path(__file__).resolve().parents[2]
SMALL = SyntheticConfig(bags_per_class=3, feature_dim=16, min_instances=20, max_instances=40)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """12 slides of the project's own features (tiny hierarchy), a DATA_SPLIT.csv, a sheet,
    and the predictions of one epoch of HMIL trained on them."""
    found = write_fold_cohort(tmp_path_factory.mktemp("own"), SMALL, 1, 1)
    found["own"] = found["root"] / "features"
    found["slide_ids"] = list(found["table"]["slide_id"])
    found["sheet"] = write_sheet(found["root"] / "slides.csv", found["table"])
    found["run"] = train(found, found["own"], found["root"] / "run_own")
    return found


def train(cohort, features: Path, out: Path) -> Path:
    args = [
        "--features", str(features), "--splits", str(cohort["splits"]), "--fold", "0",
        "--model", "hmil", "--hierarchy", str(cohort["hierarchy"]), "--out", str(out),
        "--epochs", "1", "--batch-bags", "4", "--seed", "3",
    ]  # fmt: skip
    assert train_main(args) == 0
    return out


def predictions(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "predictions.csv")


def one_error_line(capsys, args: list[str]) -> str:
    return train_cli.one_error_line(capsys, args, cli=main)


def run_import(cohort, source: Path, out: Path, encoder: str = "conch_v15", *extra: str):
    args = [str(source), "--sheet", str(cohort["sheet"]), "--encoder", encoder]
    assert main([*args, "--out-dir", str(out), *extra]) == 0
    return pd.read_csv(out / "imported.csv")


# --- the three layouts train to the same predictions -----------------------------------------


@pytest.mark.parametrize("layout", ["clam", "trident", "pt"])
def test_imported_cohort_trains_to_the_predictions_of_the_own_features(cohort, tmp_path, layout):
    ids = cohort["slide_ids"]
    if layout == "clam":  # h5_files for all but one slide, which only has its pt_files tensor
        source = write_clam(cohort["own"], tmp_path / "clam", ids, pt_only=(ids[0],))
        expected = {"clam": len(ids) - 1, "clam_pt": 1}
    elif layout == "trident":
        source = write_trident(cohort["own"], tmp_path / "20x_256px", ids, "conch_v15")
        expected = {"trident": len(ids)}
    else:
        source = write_pt(cohort["own"], tmp_path / "hmil_pt", ids)
        expected = {"pt": len(ids)}

    summary = run_import(cohort, source, tmp_path / "features")

    assert (summary["status"] == "ok").all()
    assert summary["layout"].value_counts().to_dict() == expected
    has_coords = {s: layout == "trident" or (layout == "clam" and s != ids[0]) for s in ids}
    assert summary.set_index("slide_id")["coords"].to_dict() == has_coords
    run = train(cohort, tmp_path / "features", tmp_path / "run")
    pd.testing.assert_frame_equal(predictions(run), predictions(cohort["run"]))
    if layout == "trident":  # and the evaluation of those predictions is the same too
        for name, folder in (("own", cohort["run"]), ("imported", run)):
            assert evaluate_main([str(folder), "--out", str(tmp_path / name), "--bootstrap", "0",
                                  "--name", "x/hmil"]) == 0  # fmt: skip
        own, imported = (pd.read_csv(tmp_path / n / "summary.csv") for n in ("own", "imported"))
        pd.testing.assert_frame_equal(imported, own)


def test_thin_file_links_to_the_source_and_records_where_it_came_from(cohort, tmp_path):
    """A large slide's imported file is a few KB of links and attributes, not a copy."""
    features = np.random.default_rng(0).normal(size=(4000, 384)).astype(np.float32)
    coords = np.stack(np.divmod(np.arange(4000), 80), axis=1)[:, ::-1] * PATCH_SIZE
    own = tmp_path / "own"
    own.mkdir()
    slide_id = cohort["slide_ids"][0]
    with h5py.File(own / f"{slide_id}.h5", "w") as h5:
        h5["features"], h5["coords"] = features, coords
    source = write_clam(own, tmp_path / "clam", [slide_id])
    import_cohort(source, [slide_id], "big", tmp_path / "features")

    thin = tmp_path / "features" / f"{slide_id}.h5"
    source_file = source / "h5_files" / f"{slide_id}.h5"
    assert thin.stat().st_size < source_file.stat().st_size / 100
    with h5py.File(thin, "r") as h5:
        assert isinstance(h5.get("features", getlink=True), h5py.ExternalLink)
        np.testing.assert_array_equal(h5["features"][()], features)
        np.testing.assert_array_equal(h5["coords"][()], coords)
        attrs = dict(h5.attrs)
    assert attrs["encoder"] == "big" and attrs["feature_dim"] == 384
    assert attrs["weights"] == "imported:clam" and attrs["status"] == "ok"
    assert attrs["source"] == str(source_file.resolve()) and attrs["layout"] == "clam"
    # CLAM's features h5 has no geometry: it comes from CLAM's patches file beside it.
    assert attrs["patch_size_level0"] == PATCH_SIZE and attrs["patch_level"] == 0
    assert attrs["geometry_source"] == "source attributes" and attrs["code_version"]
    assert read_bag_shape(thin, slide_id) == (4000, 384)


def test_trident_geometry_and_encoder_are_recorded(cohort, tmp_path):
    ids = cohort["slide_ids"][:2]
    source = write_trident(cohort["own"], tmp_path / "job", ids, "uni_v1")
    import_cohort(source / "features_uni_v1", ids, "uni_v1", tmp_path / "features")
    with h5py.File(tmp_path / "features" / f"{ids[0]}.h5", "r") as h5:
        attrs = dict(h5.attrs)
    assert attrs["layout"] == "trident"  # the features_<encoder> folder given directly
    assert attrs["weights"] == "imported:trident:uni_v1"
    assert (attrs["patch_size"], attrs["patch_size_level0"]) == (PATCH_SIZE // 2, PATCH_SIZE)
    assert (attrs["level0_width"], attrs["level0_height"]) == (8192, 6144)
    assert attrs["target_magnification"] == 20


def test_clam_geometry_without_patches_file_is_the_coords_grid_step(cohort, tmp_path):
    ids = cohort["slide_ids"][:1]
    source = write_clam(cohort["own"], tmp_path / "clam", ids)
    (source / "patches" / f"{ids[0]}.h5").unlink()
    import_cohort(source, ids, "x", tmp_path / "features")
    with h5py.File(tmp_path / "features" / f"{ids[0]}.h5", "r") as h5:
        assert h5.attrs["patch_size_level0"] == PATCH_SIZE
        assert h5.attrs["geometry_source"].startswith("coords grid step")


# --- bad input -------------------------------------------------------------------------------


def test_missing_and_non_finite_slides_are_recorded_failed(cohort, tmp_path, capsys):
    ids = cohort["slide_ids"]
    source = write_pt(cohort["own"], tmp_path / "pt", ids)
    (source / f"{ids[0]}.pt").unlink()
    bad = torch.load(source / f"{ids[1]}.pt")
    bad[3, 2] = float("nan")
    torch.save(bad, source / f"{ids[1]}.pt")

    summary = run_import(cohort, source, tmp_path / "features").set_index("slide_id")

    assert summary.loc[ids[0], "status"] == "failed"
    assert summary.loc[ids[1], "status"] == "failed"
    assert (summary.loc[ids[2:], "status"] == "ok").all()
    missing = flagged_reason(tmp_path / "features" / f"{ids[0]}.h5")
    assert missing.startswith("failed: not found in") and f"{ids[0]}.pt" in missing
    assert "1 of" in flagged_reason(tmp_path / "features" / f"{ids[1]}.h5")
    assert "NaN or Inf" in flagged_reason(tmp_path / "features" / f"{ids[1]}.h5")
    err = capsys.readouterr().err
    assert f"warning: slide {ids[0]} recorded failed" in err
    assert "no patch coordinates (layout pt): no heatmaps" in err

    args = [str(source), "--sheet", str(cohort["sheet"]), "--encoder", "x", "--strict"]
    line = one_error_line(capsys, [*args, "--out-dir", str(tmp_path / "strict")])
    assert line.startswith(f"error: slide {ids[0]}: not found in")
    assert not (tmp_path / "strict").exists()


def test_folder_without_any_sheet_slide_is_one_line(cohort, tmp_path, capsys):
    source = write_pt(cohort["own"], tmp_path / "other", cohort["slide_ids"][:2])
    for path in source.iterdir():
        path.rename(path.with_name("renamed_" + path.name))
    args = [str(source), "--sheet", str(cohort["sheet"]), "--encoder", "x"]
    line = one_error_line(capsys, [*args, "--out-dir", str(tmp_path / "out")])
    assert line == (
        f"error: {source}: none of the sheet's {len(cohort['slide_ids'])} slides found "
        "(looked for h5_files/<slide_id>.h5, features_x/<slide_id>.h5, <slide_id>.h5, "
        "pt_files/<slide_id>.pt, features_x/<slide_id>.pt, <slide_id>.pt); wrong folder, "
        "encoder name or slide ids?"
    )
    line = one_error_line(capsys, [str(tmp_path / "nowhere"), *args[1:], "--out-dir", "o"])
    assert line == f"error: {tmp_path / 'nowhere'}: features folder not found"


def test_two_dimensions_in_one_folder_is_one_line(cohort, tmp_path, capsys):
    ids = cohort["slide_ids"]
    source = write_pt(cohort["own"], tmp_path / "pt", ids)
    torch.save(torch.zeros(5, 8), source / f"{ids[4]}.pt")
    args = [str(source), "--sheet", str(cohort["sheet"]), "--encoder", "x"]
    line = one_error_line(capsys, [*args, "--out-dir", str(tmp_path / "out")])
    assert line == (
        f"error: {(source / ids[4]).resolve()}.pt: features are 8-d, those of "
        f"{len(ids) - 1} other slides 16-d; features of two encoders in one folder?"
    )
    assert not (tmp_path / "out").exists()


def test_features_named_for_a_project_encoder_must_have_its_dimension(cohort, tmp_path, capsys):
    source = write_pt(cohort["own"], tmp_path / "pt", cohort["slide_ids"])
    args = [str(source), "--sheet", str(cohort["sheet"]), "--encoder", "uni"]
    line = one_error_line(capsys, [*args, "--out-dir", str(tmp_path / "out")])
    assert "features are 16-d but the project's encoder uni gives 1024-d" in line


def test_moved_source_is_one_bag_error_naming_the_link(cohort, tmp_path):
    ids = cohort["slide_ids"][:2]
    source = write_clam(cohort["own"], tmp_path / "clam", ids, pt_only=(ids[1],))
    import_cohort(source, ids, "x", tmp_path / "features")
    assert load_bag_features(tmp_path / "features" / f"{ids[1]}.h5", ids[1]).shape[1] == 16
    source.rename(tmp_path / "moved")
    with pytest.raises(BagError, match=r"'features' link to .*h5_files/.* is broken"):
        read_bag_shape(tmp_path / "features" / f"{ids[0]}.h5", ids[0])
    with pytest.raises(BagError, match=r"its features are .*pt_files/.*\.pt, which is missing"):
        load_bag_features(tmp_path / "features" / f"{ids[1]}.h5", ids[1])


def test_help_names_every_option():
    out = subprocess.run(
        [sys.executable, "-m", "preprocessing.import_features", "--help"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout  # fmt: skip
    for option in ("--sheet", "--encoder", "--out-dir", "--patches-dir", "--strict"):
        assert option in out


def test_clam_patch_geometry_at_a_lower_level_is_scaled_to_level0():
    """CLAM's patch_size is at patch_level; level 0 is `downsample` times larger."""
    clam = {"patch_size": 256, "patch_level": 1, "downsample": np.array([4.0, 4.0])}
    geometry = patch_geometry({}, clam, np.zeros((0, 2), np.int64))
    assert geometry["patch_size_level0"] == 1024.0 and geometry["patch_level"] == 1
    coords = np.array([[0, 0], [512, 0], [512, 512]])  # nothing recorded: the grid step
    assert patch_geometry({}, {}, coords)["patch_size_level0"] == 512.0
    assert patch_geometry({}, {}, coords[:1]) == {}  # one patch: unknown, no heatmap


def test_trident_slide_without_patches_is_recorded_empty(cohort, tmp_path):
    """TRIDENT writes a slide without tissue as `features` of shape (0,)."""
    ids = cohort["slide_ids"][:2]
    source = write_trident(cohort["own"], tmp_path / "job", ids, "uni_v1")
    with h5py.File(source / "features_uni_v1" / f"{ids[0]}.h5", "w") as h5:
        h5["features"], h5["coords"] = np.zeros(0, np.float32), np.zeros((0, 2), np.int64)
    summary = import_cohort(source, ids, "uni_v1", tmp_path / "features")
    assert summary["status"].tolist() == ["empty", "ok"]
    assert flagged_reason(tmp_path / "features" / f"{ids[0]}.h5").endswith(": 0 patches")
