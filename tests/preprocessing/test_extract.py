"""`python -m preprocessing.extract` on a real H&E crop, generated slides and broken inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import cv2
import h5py
import numpy as np
import openslide
import pandas as pd
import pytest
import timm
import torch

import preprocessing.features.extraction
import preprocessing.features.runner
from plumbing.cli import run_cli
from plumbing.errors import SlideError
from preprocessing.extract import main
from preprocessing.features.encoders import build_encoder
from preprocessing.features.features_files import validate_features
from preprocessing.slides.patching import PatchParams, patch_slide, write_failure, write_outputs
from preprocessing.slides.synthetic import Ellipse, SlideSpec, write_slide

ENCODER = "timm:resnet10t"  # small and fast; what is tested does not depend on the encoder


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("extract")


@pytest.fixture(scope="module")
def weights(work):
    """Fixed weights on disk, so features can be recomputed outside the CLI."""
    torch.manual_seed(0)
    path = work / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def cmu(fixture_slides, work):
    """The real H&E crop and its patches h5 (40 patches of 256 px at 0.5 µm/px)."""
    slide = fixture_slides / "cmu_small_region.svs"
    params = PatchParams()
    out = work / "cmu_patches.h5"
    write_outputs(patch_slide(slide, params), params, out, None, None)
    return slide, out


@pytest.fixture(scope="module")
def reference(cmu, weights, work):
    """Features of every cmu patch, read by two DataLoader workers."""
    slide, patches = cmu
    out = work / "reference" / "cmu.h5"
    code = main(cli_args(slide, patches, out, weights, "--workers", "2", "--batch-size", "16"))
    assert code == 0
    return out


def cli_args(slide, patches, out, weights, *extra):
    return [
        str(slide), str(patches), "--encoder", ENCODER, "--out", str(out),
        "--weights", str(weights), "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


def run(argv, capsys):
    """Run the CLI in-process as `python -m` would; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as done:
        run_cli(main, argv)
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


def read_features(path):
    with h5py.File(path) as h5:
        return {name: h5[name][:] for name in h5}, dict(h5.attrs)


def patches_coords(path):
    with h5py.File(path) as h5:
        return h5["coords"][:]


def write_patches_like(source, target, coords, **overrides):
    """A patches h5 with `source`'s attributes and other coords (order, subsets, crafted)."""
    with h5py.File(source) as h5:
        attrs = dict(h5.attrs)
    attrs.update(overrides, n_patches=len(coords))
    with h5py.File(target, "w") as h5:
        h5.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
        h5.attrs.update(attrs)
    return target


def assert_one_error_line(err, *fragments):
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def encode_directly(model, spec, rgb):
    """Reference path: plain arrays, per-image normalisation on the CPU."""
    image = cv2.resize(rgb, (spec.input_size,) * 2, interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        return model(x)[0].numpy()


# --- what the features are ------------------------------------------------------------------


def test_features_equal_a_direct_openslide_read_of_each_patch(cmu, weights, reference):
    slide_path, patches = cmu
    data, attrs = read_features(reference)
    coords = patches_coords(patches)
    assert data["features"].shape == (40, 512) and data["features"].dtype == np.float32
    np.testing.assert_array_equal(data["coords"], coords)  # row i ↔ patches row i
    model, spec, record = build_encoder(ENCODER, weights)
    slide = openslide.OpenSlide(str(slide_path))
    size = attrs["read_size"]
    assert size == 257 and attrs["read_level"] == 0  # 256 px × 0.5 / 0.499 µm/px, one level
    for row in (0, 13, 39):
        rgb = np.asarray(slide.read_region(tuple(int(v) for v in coords[row]), 0, (size, size)))
        expected = encode_directly(model, spec, np.ascontiguousarray(rgb[..., :3]))
        np.testing.assert_allclose(data["features"][row], expected, rtol=1e-4, atol=1e-4)
    # the .pt twin holds the same N×D float32 matrix
    tensor = torch.load(reference.with_suffix(".pt"), weights_only=True)
    assert tensor.dtype == torch.float32
    np.testing.assert_array_equal(tensor.numpy(), data["features"])
    # provenance and the patching attributes
    assert attrs["encoder"] == ENCODER and attrs["weights"] == record
    assert record.startswith("file:resnet10t.pth:sha256:")
    assert (attrs["feature_dim"], attrs["n_patches"], attrs["n_skipped"]) == (512, 40, 0)
    assert (attrs["precision"], attrs["device"], attrs["dtype"]) == ("fp32", "cpu", "float32")
    assert attrs["status"] == "ok" and attrs["status_reason"] == ""
    for key in ("patch_size", "patch_size_level0", "slide_mpp", "target_mpp", "mpp_source"):
        assert key in attrs, key
    assert attrs["patches_code_version"] and attrs["code_version"]
    assert json.loads(attrs["params"])["workers"] == 2
    assert validate_features(reference, patches, ENCODER, record) is None


def test_same_slide_twice_gives_identical_features(cmu, weights, reference, work):
    slide, patches = cmu
    again = work / "again" / "cmu.h5"
    assert (
        main(cli_args(slide, patches, again, weights, "--workers", "0", "--batch-size", "16")) == 0
    )
    np.testing.assert_array_equal(
        read_features(again)[0]["features"], read_features(reference)[0]["features"]
    )


def test_random_weights_are_seeded_so_two_runs_give_identical_features(cmu, tmp_path):
    slide, patches = cmu
    runs = []
    for name in ("first", "second"):
        out = tmp_path / f"{name}.h5"
        torch.manual_seed(len(name))  # the caller's random state must not matter
        assert main(cli_args(slide, patches, out, "random", "--workers", "0")) == 0
        runs.append(read_features(out))
    (first, attrs), (second, _) = runs
    assert attrs["weights"] == "random" and attrs["weights_seed"] == 0
    assert np.array_equal(first["features"], second["features"])
    assert np.abs(first["features"]).max() > 0


def test_rows_follow_the_patches_order_across_workers(cmu, weights, reference, work):
    slide, patches = cmu
    order = np.random.default_rng(3).permutation(40)[:17]
    shuffled = write_patches_like(patches, work / "shuffled.h5", patches_coords(patches)[order])
    out = work / "shuffled" / "f.h5"
    argv = cli_args(slide, shuffled, out, weights, "--workers", "2", "--batch-size", "3")
    assert main(argv) == 0
    data, _ = read_features(out)
    np.testing.assert_array_equal(data["coords"], patches_coords(patches)[order])
    expected = read_features(reference)[0]["features"][order]
    np.testing.assert_allclose(data["features"], expected, rtol=1e-5, atol=1e-5)


def test_float16_output_is_within_tolerance_of_float32(cmu, weights, reference, work):
    slide, patches = cmu
    subset = write_patches_like(patches, work / "subset8.h5", patches_coords(patches)[:8])
    out = work / "half" / "f.h5"
    assert main(cli_args(slide, subset, out, weights, "--dtype", "float16", "--workers", "0")) == 0
    data, attrs = read_features(out)
    assert data["features"].dtype == np.float16 and attrs["dtype"] == "float16"
    full = read_features(reference)[0]["features"][:8]
    np.testing.assert_allclose(data["features"].astype(np.float32), full, rtol=2e-3, atol=1e-3)
    assert not np.array_equal(data["features"].astype(np.float32), full)  # really rounded
    assert torch.load(out.with_suffix(".pt"), weights_only=True).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_features_match_the_cpu_ones(cmu, weights, reference, work, precision):
    """Batches of 7 keep several in flight (copies back are asynchronous on CUDA)."""
    slide, patches = cmu
    out = work / f"cuda_{precision}" / "f.h5"
    argv = cli_args(slide, patches, out, weights, "--workers", "2", "--batch-size", "7")
    argv[argv.index("cpu")] = "cuda"
    assert main([*argv, "--precision", precision]) == 0
    data, attrs = read_features(out)
    assert attrs["device"].startswith("cuda") and attrs["precision"] == precision
    expected = torch.from_numpy(read_features(reference)[0]["features"])
    got = torch.from_numpy(data["features"])
    np.testing.assert_array_equal(data["coords"], patches_coords(patches))
    # TF32 convolutions (fp32) and autocast round; every row still points the same way
    similarity = torch.nn.functional.cosine_similarity(got, expected, dim=1)
    assert float(similarity.min()) > (0.999 if precision == "fp32" else 0.99), similarity.min()


def test_pyramid_slide_is_read_at_the_level_of_the_encoder_mpp(tmp_path, weights):
    spec = SlideSpec(width=3072, height=2048, mpp=0.25, regions=(Ellipse(380, 256, 300, 200),))
    slide_path = write_slide(tmp_path / "pyramid.tiff", spec)
    params = PatchParams()
    patches = tmp_path / "p.h5"
    write_outputs(patch_slide(slide_path, params), params, patches, None, None)
    out = tmp_path / "f.h5"
    assert main(cli_args(slide_path, patches, out, weights, "--workers", "0")) == 0
    data, attrs = read_features(out)
    # 0.25 µm/px level 0: the 0.5 µm/px encoder reads level 1, 256 px per 512 level-0 px
    assert (attrs["read_level"], attrs["read_size"]) == (1, 256)
    assert len(data["features"]) == len(patches_coords(patches)) > 3
    model, encoder, _ = build_encoder(ENCODER, weights)
    slide = openslide.OpenSlide(str(slide_path))
    x, y = (int(v) for v in data["coords"][-1])
    rgb = np.asarray(slide.read_region((x, y), 1, (256, 256)))[..., :3]
    expected = encode_directly(model, encoder, np.ascontiguousarray(rgb))
    np.testing.assert_allclose(data["features"][-1], expected, rtol=1e-4, atol=1e-4)


# --- flagged and bad inputs -----------------------------------------------------------------


def test_slide_without_tissue_gives_an_empty_flagged_features_file(blank_slide, tmp_path, capsys):
    params = PatchParams()
    patches = tmp_path / "blank.h5"
    write_outputs(patch_slide(blank_slide, params), params, patches, None, None)
    out = tmp_path / "f.h5"
    code, stdout, _ = run(cli_args(blank_slide, patches, out, "random"), capsys)
    assert code == 0
    assert stdout.startswith(f"warning: {blank_slide}: ") and "empty" in stdout
    data, attrs = read_features(out)
    assert data["features"].shape == (0, 512) and data["coords"].shape == (0, 2)
    assert attrs["status"] == "empty" and attrs["status_reason"] == "no tissue found"
    assert torch.load(out.with_suffix(".pt"), weights_only=True).shape == (0, 512)
    assert validate_features(out, patches, ENCODER) is None


def test_failed_slide_gives_an_empty_flagged_features_file(fixture_slides, tmp_path, capsys):
    slide = fixture_slides / "unopenable.tiff"
    patches = tmp_path / "failed.h5"
    error = SlideError(slide, "not a slide format OpenSlide can read")
    write_failure(error, "unopenable", PatchParams(), patches, None, None)
    out = tmp_path / "f.h5"
    code, stdout, _ = run(cli_args(slide, patches, out, "random"), capsys)
    assert code == 0 and "flagged failed" in stdout and str(slide) in stdout
    data, attrs = read_features(out)
    assert data["features"].shape == (0, 512)
    assert attrs["status"] == "failed" and "OpenSlide" in attrs["status_reason"]


@pytest.fixture
def unreadable(fixture_slides, tmp_path, cmu):
    """unreadable.svs (16×16, its one tile corrupt) with a crafted grid of 16 px patches:
    the middle patch touches the corrupt tile, the others lie beyond it (read as white)."""
    patches = write_patches_like(
        cmu[1], tmp_path / "unreadable.h5", [[64, 0], [0, 0], [128, 0]],
        patch_size=16, patch_size_level0=16, patch_size_level0_exact=16.0, slide_mpp=0.499,
        level0_width=16, level0_height=16, slide_id="unreadable",
    )  # fmt: skip
    return fixture_slides / "unreadable.svs", patches


def test_corrupt_tile_is_one_error_line_naming_slide_and_coordinate(unreadable, tmp_path, capsys):
    slide, patches = unreadable
    out = tmp_path / "f.h5"
    code, _, err = run(cli_args(slide, patches, out, "random", "--workers", "1"), capsys)
    assert code == 1
    assert_one_error_line(err, "unreadable.svs", "level-0 (0, 0)", "--on-bad-patch skip")
    assert list(tmp_path.glob("f*")) == [] and list(tmp_path.glob(".f*")) == []


@pytest.mark.parametrize("batch_size", ["64", "1"])  # one batch; the bad patch alone in one
def test_skip_leaves_bad_patches_out_and_records_them(unreadable, tmp_path, capsys, batch_size):
    slide, patches = unreadable
    out = tmp_path / "f.h5"
    argv = cli_args(slide, patches, out, "random", "--workers", "1", "--on-bad-patch", "skip")
    argv += ["--batch-size", batch_size, "--max-unreadable-fraction", "0.5"]
    code, stdout, _ = run(argv, capsys)
    assert code == 0 and "degraded: 1 of 3 patches unreadable (33.3%), skipped" in stdout
    data, attrs = read_features(out)
    np.testing.assert_array_equal(data["coords"], [[64, 0], [128, 0]])
    np.testing.assert_array_equal(data["skipped_coords"], [[0, 0]])
    np.testing.assert_array_equal(data["skipped_indices"], [1])
    assert attrs["n_skipped"] == 1 and attrs["n_patches"] == 2 and attrs["status"] == "ok"
    # both kept patches are blank glass; the read after the failure worked (handle reopened)
    np.testing.assert_array_equal(data["features"][0], data["features"][1])
    assert np.isfinite(data["features"]).all()
    assert validate_features(out, patches, ENCODER, "random") is None


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("missing_patches", ["nowhere.h5", "patches file not found"]),
        ("patches_not_h5", ["junk.h5", "not a readable patches h5"]),
        ("unknown_encoder", ["'resnet51'", "resnet50_trunc", "uni"]),
        ("missing_weights", ["nowhere.pth", "weights file not found"]),
        ("wrong_architecture", ["resnet10t.pth", "does not fit encoder uni", "missing keys"]),
        ("other_slide", ["small.svs", "differs from", "not the slide it was patched from"]),
    ],
)
def test_bad_input_is_one_error_line_and_no_output(
    case, fragments, cmu, weights, fixture_slides, tmp_path, capsys
):
    slide, patches = cmu
    out = tmp_path / "out" / "f.h5"
    argv = cli_args(slide, patches, out, weights)
    if case == "missing_patches":
        argv[1] = str(tmp_path / "nowhere.h5")
    elif case == "patches_not_h5":
        junk = tmp_path / "junk.h5"
        junk.write_text("slide_id,path\n")
        argv[1] = str(junk)
    elif case == "unknown_encoder":
        argv[argv.index(ENCODER)] = "resnet51"
    elif case == "missing_weights":
        argv[argv.index(str(weights))] = str(tmp_path / "nowhere.pth")
    elif case == "wrong_architecture":
        argv[argv.index(ENCODER)] = "uni"
    elif case == "other_slide":
        argv[0] = str(fixture_slides / "small.svs")
    code, _, err = run(argv, capsys)
    assert code == 1
    assert_one_error_line(err, *fragments)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_encoder_giving_nan_is_one_error_line_and_no_output(cmu, weights, tmp_path, capsys):
    slide, patches = cmu
    state = torch.load(weights, weights_only=True)
    state["conv1.0.weight"][0, 0, 0, 0] = float("nan")
    broken = tmp_path / "nan.pth"
    torch.save(state, broken)
    subset = write_patches_like(patches, tmp_path / "p4.h5", patches_coords(patches)[:4])
    out = tmp_path / "out" / "f.h5"
    code, _, err = run(cli_args(slide, subset, out, broken, "--workers", "0"), capsys)
    assert code == 1
    assert_one_error_line(err, "gave NaN/Inf features for 4 patches", "nan.pth")
    assert not out.exists() and not out.with_suffix(".pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_one_error_line(cmu, tmp_path, capsys):
    slide, patches = cmu
    argv = cli_args(slide, patches, tmp_path / "f.h5", "random")
    argv[argv.index("cpu")] = "cuda"
    code, _, err = run(argv, capsys)
    assert code == 1
    assert_one_error_line(err, "--device cuda", "no CUDA GPU")


def test_cli_has_help_and_runs_as_a_module(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    usage = capsys.readouterr().out
    assert all(f"--{flag}" in usage for flag in ("on-bad-patch", "weights", "check", "out-pt"))
    done = subprocess.run(
        [sys.executable, "-m", "preprocessing.extract", "s.svs", str(tmp_path / "p.h5"),
         "--encoder", ENCODER, "--out", str(tmp_path / "f.h5")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'p.h5'}: patches file not found"
    ]


# --- re-runs ----------------------------------------------------------------------------------


@pytest.fixture
def small_output(cmu, weights, tmp_path):
    """A finished output over 8 patches, and the arguments that made it."""
    slide, patches = cmu
    subset = write_patches_like(patches, tmp_path / "p8.h5", patches_coords(patches)[:8])
    out = tmp_path / "f.h5"
    argv = cli_args(slide, subset, out, weights, "--workers", "0")
    assert main(argv) == 0
    return out, subset, argv


def test_valid_output_is_kept_without_recomputing(small_output, capsys):
    out, _, argv = small_output
    before = (out.stat().st_mtime_ns, out.with_suffix(".pt").stat().st_mtime_ns)
    code, stdout, _ = run(argv, capsys)
    assert code == 0 and "already complete and valid; skipped" in stdout
    assert (out.stat().st_mtime_ns, out.with_suffix(".pt").stat().st_mtime_ns) == before
    assert run([*argv, "--check"], capsys)[0] == 0


def _corrupt(out, how):
    if how == "nan":
        with h5py.File(out, "r+") as h5:
            h5["features"][3, 7] = np.nan
        return "NaN"
    if how == "truncated":
        data = out.read_bytes()
        out.write_bytes(data[: len(data) // 2])
        return "not a readable HDF5 file"
    if how == "missing_pt":
        out.with_suffix(".pt").unlink()
        return "f.pt not found"
    with h5py.File(out, "r+") as h5:  # another encoder's output at that path
        h5.attrs["encoder"] = "uni"
    return "made by encoder uni"


@pytest.mark.parametrize("how", ["nan", "truncated", "missing_pt", "other_encoder"])
def test_invalid_output_is_detected_and_rebuilt(small_output, how, capsys, caplog):
    out, patches, argv = small_output
    good = read_features(out)[0]["features"]
    reason = _corrupt(out, how)
    code, _, err = run([*argv, "--check"], capsys)
    assert code == 1
    assert_one_error_line(err, str(out), reason)
    with caplog.at_level("WARNING", logger="hmil.extract"):
        code, stdout, _ = run(argv, capsys)
    assert code == 0 and "skipped" not in stdout
    assert any("invalid" in r.message and reason in r.message for r in caplog.records)
    np.testing.assert_array_equal(read_features(out)[0]["features"], good)
    assert validate_features(out, patches, ENCODER, pt_path=out.with_suffix(".pt")) is None


def test_validate_features_names_the_problem(small_output, cmu, tmp_path):
    out, subset, _ = small_output
    assert validate_features(tmp_path / "none.h5") == "file not found"
    assert "coords differ" in validate_features(
        out, write_patches_like(subset, tmp_path / "moved.h5", patches_coords(subset) + 1)
    )
    assert "8 feature rows" in validate_features(out, cmu[1])  # 40 patches there
    assert "not random" in validate_features(out, weights="random")
    assert "not float16" in validate_features(out, dtype="float16")
    copy = shutil.copy(out, tmp_path / "copy.h5")
    with h5py.File(copy, "r+") as h5:
        h5.attrs["feature_dim"] = 384
    assert "512-d but feature_dim says 384" in validate_features(copy)


# --- a cohort in one process (--sheet) ----------------------------------------------------


@pytest.fixture
def cohort(cmu, fixture_slides, tmp_path):
    """cmu (8 patches), broken (a corrupt tile under its middle patch) and ghost (no patches
    file), in that order."""
    slide, patches = cmu
    patches_dir = tmp_path / "patches"
    patches_dir.mkdir()
    write_patches_like(patches, patches_dir / "cmu.h5", patches_coords(patches)[:8])
    write_patches_like(
        patches, patches_dir / "broken.h5", [[64, 0], [0, 0], [128, 0]],
        patch_size=16, patch_size_level0=16, patch_size_level0_exact=16.0, slide_mpp=0.499,
        level0_width=16, level0_height=16, slide_id="broken",
    )  # fmt: skip
    sheet = tmp_path / "slides.csv"
    pd.DataFrame(
        {
            "slide_id": ["cmu", "broken", "ghost"],
            "path": [slide, fixture_slides / "unreadable.svs", slide],
        }
    ).to_csv(sheet, index=False)
    return {"sheet": sheet, "patches": patches_dir, "out": tmp_path / "features"}


def cohort_args(cohort, weights, *extra, sheet=None):
    return [
        "--sheet", str(sheet or cohort["sheet"]), "--patches-dir", str(cohort["patches"]),
        "--out-dir", str(cohort["out"]), "--encoder", ENCODER, "--weights", str(weights),
        "--device", "cpu", "--workers", "0", "--no-progress", *extra,
    ]  # fmt: skip


def test_a_cohort_is_encoded_and_failing_slides_are_listed(cohort, weights, reference, capsys):
    code, stdout, err = run(cohort_args(cohort, weights), capsys)
    assert code == 0
    out = cohort["out"]
    assert sorted(p.name for p in out.iterdir()) == ["cmu.h5", "cmu.pt", "failed_slides.csv"]
    data, attrs = read_features(out / "cmu.h5")
    expected = read_features(reference)[0]["features"][:8]  # the one-slide CLI's features
    np.testing.assert_allclose(data["features"], expected, rtol=1e-5, atol=1e-5)
    assert attrs["encoder"] == ENCODER and attrs["status"] == "ok"
    assert validate_features(out / "cmu.h5", cohort["patches"] / "cmu.h5", ENCODER) is None
    failed = pd.read_csv(out / "failed_slides.csv").set_index("slide_id")["reason"]
    assert list(failed.index) == ["broken", "ghost"]
    assert "unreadable.svs" in failed["broken"] and "level-0 (0, 0)" in failed["broken"]
    assert "ghost.h5: patches file not found" in failed["ghost"]
    assert "1 of 3 slides have features" in stdout and "2 failed" in stdout
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "Traceback" not in err


def test_a_rerun_keeps_valid_outputs_without_loading_the_model(
    cohort, weights, capsys, monkeypatch
):
    assert run(cohort_args(cohort, weights), capsys)[0] == 0
    written = (cohort["out"] / "cmu.h5").stat().st_mtime_ns
    only_cmu = cohort["sheet"].with_name("cmu_only.csv")
    pd.read_csv(cohort["sheet"]).head(1).to_csv(only_cmu, index=False)

    def no_model(*_):
        raise AssertionError("the encoder was built although every output is valid")

    monkeypatch.setattr(preprocessing.features.extraction, "build_encoder", no_model)
    code, stdout, _ = run(cohort_args(cohort, weights, sheet=only_cmu), capsys)
    assert code == 0 and "already complete and valid; skipped" in stdout
    assert (cohort["out"] / "cmu.h5").stat().st_mtime_ns == written
    assert pd.read_csv(cohort["out"] / "failed_slides.csv").empty


def test_strict_stops_at_the_first_failing_slide(cohort, weights, capsys):
    code, _, err = run(cohort_args(cohort, weights, "--strict"), capsys)
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "unreadable.svs" in errors[0], err
    # cmu came first and is complete; ghost was never tried; no list of failures
    assert sorted(p.name for p in cohort["out"].iterdir()) == ["cmu.h5", "cmu.pt"]


def test_a_shard_encodes_only_its_slides_and_records_failures_as_flagged_files(
    cohort, weights, capsys
):
    failed_list = cohort["out"].parent / "shard0_failed.csv"
    argv = cohort_args(cohort, weights, "--slide-ids", "broken", "cmu", "--record-failed")
    code, stdout, err = run([*argv, "--failed-list", str(failed_list)], capsys)
    assert code == 0
    out = cohort["out"]
    assert sorted(p.name for p in out.iterdir()) == ["broken.h5", "broken.pt", "cmu.h5", "cmu.pt"]
    data, attrs = read_features(out / "broken.h5")
    assert data["features"].shape == (0, 512) and attrs["status"] == "failed"
    assert "unreadable.svs" in attrs["status_reason"] and "level-0 (0, 0)" in attrs["status_reason"]
    # not a valid output to keep: a re-run tries the slide again
    problem = validate_features(out / "broken.h5", cohort["patches"] / "broken.h5", ENCODER)
    assert problem.startswith("0 feature rows + 0 skipped != 3 patches")
    assert list(pd.read_csv(failed_list)["slide_id"]) == ["broken"]
    assert "recorded as failed in" in err and "1 of 2 slides have features" in stdout


def test_a_shard_whose_every_slide_fails_is_one_line(cohort, weights, capsys):
    argv = cohort_args(cohort, weights, "--slide-ids", "broken")
    code, _, err = run(argv, capsys)
    assert code == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "unreadable.svs" in errors[0]  # the slide, then the shard
    assert "slides.csv: every one of the 1 slides failed" in errors[1]
    code, _, err = run([*argv, "--record-failed"], capsys)  # the workflow: recorded, goes on
    assert code == 0 and "warning: every one of the 1 slides failed" in err
    assert read_features(cohort["out"] / "broken.h5")[1]["status"] == "failed"


def test_unknown_slide_ids_are_one_line(cohort, weights, capsys):
    code, _, err = run(cohort_args(cohort, weights, "--slide-ids", "cmu", "nobody"), capsys)
    assert code == 1
    assert_one_error_line(err, "slides.csv", "--slide-ids nobody not in the sheet")


def test_check_validates_every_slide_of_the_sheet(cohort, weights, capsys):
    assert run(cohort_args(cohort, weights), capsys)[0] == 0
    code, stdout, err = run(cohort_args(cohort, weights, "--check"), capsys)
    assert code == 1
    assert "cmu.h5: valid features of cmu" in stdout
    assert "broken.h5: file not found" in err and "ghost.h5: file not found" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--sheet", "s.csv", "slide.svs", "p.h5", "--out-dir", "o", "--patches-dir", "p"],
        ["--sheet", "s.csv", "--out-dir", "o"],
        ["slide.svs", "p.h5"],
        ["slide.svs", "p.h5", "--out", "f.h5", "--strict"],
        ["slide.svs", "p.h5", "--out", "f.h5", "--slide-ids", "a"],
    ],
)
def test_mixing_the_two_modes_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main([*argv, "--encoder", ENCODER])
    assert done.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize(("cpus", "on_gpu"), [(1, 1), (4, 3), (17, 16), (64, 16)])
def test_default_readers_leave_a_cpu_for_the_main_process(monkeypatch, cpus, on_gpu):
    monkeypatch.setattr(
        preprocessing.features.runner.os, "sched_getaffinity", lambda _: range(cpus)
    )
    assert preprocessing.features.runner.default_workers(torch.device("cpu")) == 1
    assert preprocessing.features.runner.default_workers(torch.device("cuda")) == on_gpu
