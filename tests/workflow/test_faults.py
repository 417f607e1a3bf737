"""Fault recovery: what a user meets after a crash, a damaged file, a bad slide or a full disk.

- Snakemake killed (SIGKILL) during feature extraction: the documented recovery
  (`--unlock`, then `--rerun-incomplete`) finishes with valid feature files and no
  temporary files left behind.
- A damaged feature file: training records the fold as failed with one line naming the
  file and the rebuild command; that command (`--forcerun` of the shard record that lists
  the slide) rebuilds it and the fold trains.
- An unreadable slide: the cohort goes on without it, `failed_slides.csv` names it (also
  in the Snakemake report); `strict: true` stops at it.
- A full disk or a folder without write permission: each writing CLI prints one line
  naming the output, exits non-zero and leaves neither the output nor a temporary file.

Each workflow test runs Snakemake in its own working directory (its own `.snakemake`
with locks and metadata), so killing and unlocking never touches other runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

from hmil.data.bags import shard_record_of
from hmil.data.synthetic import SyntheticConfig, generate_cohort
from hmil.data.synthetic import write_cohort as write_feature_cohort
from preprocessing.features.features_files import validate_features
from preprocessing.slides.demo_cohort import write_cohort
from tests.conftest import snakemake_command
from tests.workflow.configs import write_workflow_config

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SLOW_ENCODER = "timm:resnet10t"  # random weights: seconds per slide on a CPU
FAST_ENCODER = "stain_texture"  # weight-free
TEMPORARY = re.compile(r"\.tmp-\d+")


# --- helpers ---------------------------------------------------------------------------------


def write_config(folder: Path, sheet: Path, encoder: str, **changes) -> Path:
    weights = {} if encoder == FAST_ENCODER else {encoder: "random"}
    sections = {
        "features": {"weights": weights, "batch_size": 8, "workers": 0, "threads": 1},
        "splits": {"folds": 2, "val_fraction": 0.3},
        "training": {"epochs": 2, "batch_bags": 2, "patience": 2},
    }
    top = {"encoders": [encoder], "models": ["abmil"], **changes}
    return write_workflow_config(folder / "config.yaml", sheet, folder / "results", sections, **top)


def snakemake_in(folder: Path, config: Path, *extra: str) -> list[str]:
    """The project's snakemake command, but with `folder` as working directory."""
    command = snakemake_command(config, *extra)
    command[command.index("--directory") + 1] = str(folder)
    return command


def run_in(folder: Path, config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        snakemake_in(folder, config, *extra), cwd=folder, capture_output=True, text=True
    )


def output_of(done: subprocess.CompletedProcess) -> str:
    return done.stdout + done.stderr


def temporaries(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if TEMPORARY.search(path.name)]


def assert_nothing_to_do(plan: subprocess.CompletedProcess) -> None:
    assert plan.returncode == 0, output_of(plan)[-2000:]
    output = output_of(plan)
    assert "Nothing to be done" in output or re.search(r"^total\s+0$", output, re.M), output


def processes_in_group(pgid: int, needle: bytes) -> list[int]:
    """Live processes of process group `pgid` whose command line contains `needle`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.getpgid(int(entry.name)) == pgid and needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


# --- (a) Snakemake killed during feature extraction ------------------------------------------


@pytest.mark.workflow
def test_killed_during_extraction_recovers_with_unlock_and_rerun_incomplete(tmp_path):
    sheet = write_cohort(
        tmp_path / "cohort", n_slides=4, width=3000, height=2000, seed=4, slides_per_patient=(1,)
    )
    config = write_config(tmp_path, sheet, SLOW_ENCODER)
    results = tmp_path / "results"
    features = results / "features" / SLOW_ENCODER
    until = ("--until", "extract_features")
    snakemake = subprocess.Popen(
        snakemake_in(tmp_path, config, *until),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # own process group: the kill takes the jobs too
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and snakemake.poll() is None:
            finished = list(features.glob("*.h5")) if features.is_dir() else []
            if finished and processes_in_group(snakemake.pid, b"preprocessing.extract"):
                break
            time.sleep(0.05)
        else:
            pytest.fail("no moment with a finished and a running extraction job to kill")
    finally:
        os.killpg(snakemake.pid, signal.SIGKILL)
        snakemake.wait()
    assert not processes_in_group(snakemake.pid, b"preprocessing.extract")
    assert len(list(features.glob("*.h5"))) < 4, "killed after extraction had finished"

    # The plain re-run is refused, and says what to do: files of jobs that were running
    # are marked incomplete (--rerun-incomplete) and the killed run's lock stays (--unlock).
    refused = run_in(tmp_path, config, *until)
    assert refused.returncode != 0
    assert re.search(r"--unlock|--rerun-incomplete", output_of(refused)), output_of(refused)
    assert "--unlock" in output_of(run_in(tmp_path, config, "--rerun-incomplete", *until))

    # The recovery docs/cluster.md documents ("After a crash").
    unlocked = run_in(tmp_path, config, "--unlock")
    assert unlocked.returncode == 0, output_of(unlocked)[-2000:]
    done = run_in(tmp_path, config, "--rerun-incomplete", *until)
    assert done.returncode == 0, output_of(done)[-3000:]

    slides = pd.read_csv(sheet)["slide_id"]
    assert sorted(p.name for p in features.iterdir() if p.is_file()) == sorted(
        f"{slide}{suffix}" for slide in slides for suffix in (".h5", ".pt")
    )
    for slide in slides:
        problem = validate_features(
            features / f"{slide}.h5",
            results / "patches" / f"{slide}.h5",
            encoder=SLOW_ENCODER,
            weights="random",
            pt_path=features / f"{slide}.pt",
        )
        assert problem is None, f"{slide}: {problem}"
    assert temporaries(results) == []
    assert_nothing_to_do(run_in(tmp_path, config, "--dry-run", *until))


# --- (b) a damaged feature file ---------------------------------------------------------------


def two_class_cohort(folder: Path, n_slides: int = 8) -> Path:
    """Generated slides relabelled to two classes of a two-level hierarchy, so that 8
    slides (4 patients per class) make valid 2-fold splits."""
    sheet_path = write_cohort(
        folder, n_slides=n_slides, width=2000, height=1500, seed=2, slides_per_patient=(1,)
    )
    sheet = pd.read_csv(sheet_path)
    sheet["label"] = ["normal", "invasive"] * (n_slides // 2)
    sheet.to_csv(sheet_path, index=False)
    hierarchy = {
        "name": "two",
        "coarse": ["benign", "malignant"],
        "fine": {"normal": "benign", "invasive": "malignant"},
    }
    (folder / "hierarchy.yaml").write_text(yaml.safe_dump(hierarchy, sort_keys=False))
    return sheet_path


def damage_features_data(path: Path) -> None:
    """Overwrite bytes in the middle of the stored `features` values (the file still opens)."""
    with h5py.File(path, "r") as h5:
        dataset = h5["features"]
        if dataset.chunks is None:
            start, size = dataset.id.get_offset(), dataset.id.get_storage_size()
        else:
            chunk = dataset.id.get_chunk_info(0)
            start, size = chunk.byte_offset, chunk.size
    with path.open("r+b") as file:
        file.seek(start + size // 2)
        file.write(np.full(64, 0x3C, np.uint8).tobytes())  # finite float16 values


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A cohort run up to one trained fold. Each test below damages a feature file and
    repairs it with the documented command, so it leaves the run complete again."""
    folder = tmp_path_factory.mktemp("trained")
    sheet = two_class_cohort(folder / "cohort")
    config = write_config(folder, sheet, FAST_ENCODER)
    results = folder / "results"
    model = results / "models" / FAST_ENCODER / "abmil" / "fold0" / "model.pt"
    first = run_in(folder, config, str(model))
    assert first.returncode == 0, output_of(first)[-3000:]
    return {"folder": folder, "config": config, "results": results, "model": model}


@pytest.mark.workflow
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_feature_file_is_named_and_rebuilt_by_forcerun(trained, damage):
    folder, config, results, model = (trained[k] for k in ("folder", "config", "results", "model"))
    splits = pd.read_csv(results / "splits" / "DATA_SPLIT.csv")
    train_slides = splits.loc[splits["fold0"] == "train", "slide_id"]
    slide = train_slides.iloc[0 if damage == "garbage" else -1]
    victim = results / "features" / FAST_ENCODER / f"{slide}.h5"
    if damage == "garbage":
        damage_features_data(victim)
    else:
        os.truncate(victim, victim.stat().st_size // 2)

    # Snakemake tracks the shard records, not each slide's file: a training run that reads
    # the damaged file (here a forced one) records the fold as failed with one line naming
    # the file and the command that rebuilds it (strict mode would stop instead:
    # tests/hmil/test_failed_runs.py); the rest of the cohort run goes on.
    assert_nothing_to_do(run_in(folder, config, "--dry-run", str(model)))
    done = run_in(folder, config, str(model), "--forcerun", "train")
    assert done.returncode == 0, output_of(done)[-3000:]
    log_path = results / "logs" / "train" / FAST_ENCODER / "abmil" / "fold0.log"
    errors = [line for line in log_path.read_text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1, log_path.read_text()[-3000:]
    assert str(victim) in errors[0] and "damaged or incomplete" in errors[0]
    # the command forces the shard record that lists the slide (its extraction job)
    record = shard_record_of(victim)
    assert record is not None and record.parent == victim.parent / "shards"
    assert f"--forcerun {record}" in errors[0] and "recorded as a failed run" in errors[0]
    assert "Traceback" not in log_path.read_text()
    metrics = json.loads((model.parent / "metrics.json").read_text())
    assert metrics["status"] == "failed" and f"--forcerun {record}" in metrics["reason"]

    rebuilt = run_in(folder, config, str(model), "--forcerun", str(record))
    assert rebuilt.returncode == 0, output_of(rebuilt)[-3000:]
    assert validate_features(victim, results / "patches" / f"{slide}.h5", FAST_ENCODER) is None
    metrics = json.loads((model.parent / "metrics.json").read_text())
    assert metrics.get("status") != "failed" and metrics["best_epoch"] is not None
    assert temporaries(results) == []
    assert_nothing_to_do(run_in(folder, config, "--dry-run", str(model)))


def test_training_checkpoint_of_other_features_is_not_resumed(readable_inputs, tmp_path):
    """The workflow re-runs a fold after a feature file was rebuilt; the fold's last.pt,
    which Snakemake does not know, must then not be resumed (it saw the old features)."""
    features = tmp_path / "features"
    shutil.copytree(readable_inputs["root"] / "features", features)  # keeps the mtimes
    arguments, _ = cli_commands(readable_inputs, tmp_path)["train"]
    arguments[arguments.index("--features") + 1] = str(features)
    arguments[arguments.index("--epochs") + 1] = "3"
    stopped = run_module([*arguments, "--stop-after", "1"])
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    shutil.copytree(tmp_path / "run", tmp_path / "run_b")

    same = run_module(arguments)
    assert same.returncode == 0, same.stderr[-2000:]
    assert "resuming" in same.stderr and "starting afresh" not in same.stderr

    rebuilt = next(iter(sorted(features.glob("*.h5"))))
    rebuilt.write_bytes(rebuilt.read_bytes())  # same content, written anew
    arguments[arguments.index("--out") + 1] = str(tmp_path / "run_b")
    changed = run_module(arguments)
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert "starting afresh" in changed.stderr and "resuming" not in changed.stderr
    assert pd.read_csv(tmp_path / "run_b" / "log.csv")["epoch"].tolist() == [0, 1, 2]


# --- (c) an unreadable slide in the cohort ----------------------------------------------------


def cohort_with_broken_slide(folder: Path, fixture_slides: Path) -> Path:
    sheet_path = write_cohort(folder, n_slides=2, width=2000, height=1500, seed=5)
    sheet = pd.read_csv(sheet_path)
    shutil.copy(fixture_slides / "unreadable.svs", folder / "broken.svs")
    sheet.loc[len(sheet)] = ["broken", "broken.svs", "P99", "normal"]
    sheet.to_csv(sheet_path, index=False)
    return sheet_path


@pytest.mark.workflow
def test_failed_slides_table_is_in_the_report(tmp_path, fixture_slides):
    sheet = cohort_with_broken_slide(tmp_path / "cohort", fixture_slides)
    config = write_config(tmp_path, sheet, FAST_ENCODER)
    results = tmp_path / "results"
    summary = results / "preprocessing" / "slides.csv"
    done = run_in(tmp_path, config, str(summary))
    assert done.returncode == 0, output_of(done)[-3000:]
    failed_csv = results / "preprocessing" / "failed_slides.csv"
    failed = pd.read_csv(failed_csv)
    assert list(failed["slide_id"]) == ["broken"]
    assert "tile data cannot be read" in failed.loc[0, "status_reason"]

    report = tmp_path / "report.zip"
    built = run_in(tmp_path, config, "--report", str(report), str(summary))
    assert built.returncode == 0, output_of(built)[-3000:]
    with zipfile.ZipFile(report) as archive:
        names = archive.namelist()
        html = archive.read(next(n for n in names if n.endswith("report.html"))).decode()
        copies = [n for n in names if n.endswith("/failed_slides.csv")]
        assert len(copies) == 1, names
        assert "broken" in archive.read(copies[0]).decode()
    categories = json.loads(re.search(r"var categories = (\{.*?\});", html, re.DOTALL)[1])
    assert str(failed_csv) in categories["1. Preprocessing"]["Cohort"]
    results_json = json.loads(re.search(r"var results = (\{.*?\});\s*</script>", html, re.S)[1])
    assert "Slides left out of the analysis" in results_json[str(failed_csv)]["caption"]


@pytest.mark.workflow
def test_strict_run_fails_naming_the_slide_and_writes_no_summary(tmp_path, fixture_slides):
    sheet = cohort_with_broken_slide(tmp_path / "cohort", fixture_slides)
    config = write_config(tmp_path, sheet, FAST_ENCODER, strict=True)
    results = tmp_path / "results"
    done = run_in(tmp_path, config, str(results / "preprocessing" / "slides.csv"))
    assert done.returncode != 0
    output = output_of(done)
    assert "Error in rule patch" in output and "slide=broken" in output
    log = (results / "logs" / "patch" / "broken.log").read_text()
    assert "broken.svs: tile data cannot be read" in log
    assert not (results / "preprocessing" / "failed_slides.csv").exists()
    assert not (results / "patches" / "broken.h5").exists()


# --- (d) full disk and missing write permission -----------------------------------------------


@pytest.fixture(scope="module")
def readable_inputs():
    """One slide with its patches and features, and a tiny feature cohort with splits, in a
    folder that every user can read (pytest's own tmp folders are root-only)."""
    root = Path(tempfile.mkdtemp(prefix="hmil-faults-"))
    try:
        sheet = write_cohort(root / "cohort", n_slides=1, width=3000, height=2000, seed=3)
        slide = root / "cohort" / pd.read_csv(sheet)["path"][0]
        patches = root / "patches.h5"
        made = subprocess.run(
            [sys.executable, "-m", "preprocessing.patch", str(slide), "--out", str(patches)],
            capture_output=True,
            text=True,
        )
        assert made.returncode == 0, made.stderr
        hierarchy_path = root / "two.yaml"
        hierarchy_path.write_text(
            yaml.safe_dump({"name": "two", "coarse": ["A", "B"], "fine": {"a": "A", "b": "B"}})
        )
        from hmil.data.hierarchy import Hierarchy

        generated = generate_cohort(
            Hierarchy.from_yaml(hierarchy_path),
            SyntheticConfig(bags_per_class=4, feature_dim=16, min_instances=5, max_instances=10),
        )
        write_feature_cohort(generated, root / "features")
        table = generated.table.copy()
        rank = table.groupby("label").cumcount()
        table["fold0"] = np.where(rank < 1, "test", np.where(rank < 2, "val", "train"))
        table.to_csv(root / "DATA_SPLIT.csv", index=False)
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield {"root": root, "slide": slide, "patches": patches, "hierarchy": hierarchy_path}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def cli_commands(inputs: dict, out: Path) -> dict[str, tuple[list[str], list[Path]]]:
    """Writing CLIs: (module arguments, the outputs they would write, the first written
    first) by name."""
    root = inputs["root"]
    return {
        "patch": (
            ["preprocessing.patch", str(inputs["slide"]), "--out", str(out / "p.h5"),
             "--qc", str(out / "qc.png"), "--geojson", str(out / "tissue.geojson")],
            [out / "qc.png", out / "tissue.geojson", out / "p.h5"],
        ),
        "extract": (
            ["preprocessing.extract", str(inputs["slide"]), str(inputs["patches"]),
             "--encoder", SLOW_ENCODER, "--weights", "random", "--workers", "0",
             "--dtype", "float16", "--no-progress", "--out", str(out / "f.h5")],
            [out / "f.h5", out / "f.pt"],
        ),
        "train": (
            ["hmil.train", "--features", str(root / "features"),
             "--splits", str(root / "DATA_SPLIT.csv"), "--fold", "0", "--model", "abmil",
             "--hierarchy", str(inputs["hierarchy"]), "--out", str(out / "run"),
             "--epochs", "2", "--batch-bags", "2"],
            [out / "run" / name for name in
             ("last.pt", "model.pt", "predictions.csv", "metrics.json", "attention.h5",
              "log.csv")],
        ),
    }  # fmt: skip


def run_module(arguments: list[str], preexec_fn=None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", *arguments],
        capture_output=True,
        text=True,
        preexec_fn=preexec_fn,
        env=environment,
        cwd=PROJECT_ROOT,
        timeout=300,
    )


def assert_one_clear_line(done: subprocess.CompletedProcess, output: Path, reason: str):
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"error: {output}: cannot write output ({reason})"], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "HDF5" not in done.stderr


def file_size_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead

    return apply


# Limits that stop each CLI at a chosen output: the QC image (first), the patches h5
# (no QC), the features h5, its .pt twin (written after the h5: both must vanish), the
# trainer's per-epoch checkpoint, and its TensorBoard log (88-byte header, then a write
# per epoch from a thread).
DISK_FULL_CASES = {
    "patch-qc": ("patch", 2_000, [], "qc.png"),
    "patch-h5": ("patch", 2_000, ["--qc", "--geojson"], "p.h5"),
    "extract-h5": ("extract", 4_000, [], "f.h5"),
    "extract-pt": ("extract", None, [], "f.pt"),
    "train": ("train", 2_000, [], "run/last.pt"),
    "train-tensorboard": ("train", 120, [], "run/tensorboard"),
}


def has_tensorboard() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def drop_options(arguments: list[str], options: list[str]) -> list[str]:
    kept, skip = [], False
    for argument in arguments:
        if skip:
            skip = False
        elif argument in options:
            skip = True
        else:
            kept.append(argument)
    return kept


@pytest.mark.parametrize("case", DISK_FULL_CASES)
def test_disk_full_gives_one_line_and_leaves_no_output(case, readable_inputs, tmp_path):
    name, limit, dropped, failing = DISK_FULL_CASES[case]
    if case == "train-tensorboard" and not has_tensorboard():
        pytest.skip("tensorboard is not installed: training writes no event file")
    arguments, outputs = cli_commands(readable_inputs, tmp_path)[name]
    arguments = drop_options(arguments, dropped)
    if limit is None:  # between the sizes of the h5 (float16) and the .pt (float32)
        reference_out = ["--out", str(tmp_path / "r.h5")]
        reference = run_module([*drop_options(arguments, ["--out"]), *reference_out])
        assert reference.returncode == 0, reference.stderr
        h5_size, pt_size = (tmp_path / "r.h5").stat().st_size, (tmp_path / "r.pt").stat().st_size
        assert h5_size < pt_size, "too few patches for the .pt to be the larger file"
        limit = (h5_size + pt_size) // 2
        (tmp_path / "r.h5").unlink()
        (tmp_path / "r.pt").unlink()
    done = run_module(arguments, preexec_fn=file_size_limit(limit))
    assert_one_clear_line(done, tmp_path / failing, "file too large")
    for output in outputs:
        assert not output.exists(), output
    assert temporaries(tmp_path) == []


def drop_write_permission_override() -> None:
    """Root without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH / CAP_FOWNER obeys permission bits
    (the venv's interpreter lives under /root, so switching to `nobody` cannot run it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2, 3):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def permission_preexec():
    if os.geteuid() != 0:
        return None  # permission bits apply as they are
    if not sys.platform.startswith("linux"):
        pytest.skip("root ignores permission bits and dropping capabilities needs Linux")
    probe = subprocess.run(
        [sys.executable, "-c", "pass"], preexec_fn=drop_write_permission_override
    )
    if probe.returncode != 0:
        pytest.skip("cannot drop CAP_DAC_OVERRIDE here: root would ignore the permission bits")
    return drop_write_permission_override


@pytest.mark.parametrize("name", ["patch", "extract", "train"])
def test_permission_denied_gives_one_line_and_leaves_no_output(name, readable_inputs, tmp_path):
    preexec = permission_preexec()
    locked = tmp_path / "locked"
    locked.mkdir()
    arguments, outputs = cli_commands(readable_inputs, locked)[name]
    locked.chmod(0o555)
    try:
        done = run_module(arguments, preexec_fn=preexec)
    finally:
        locked.chmod(0o755)
    first = outputs[0]
    if name == "train" and has_tensorboard():
        first = locked / "run" / "tensorboard"  # created before the first epoch
    assert_one_clear_line(done, first, "permission denied")
    for output in outputs:
        assert not output.exists(), output
    assert list(locked.iterdir()) == []


def test_temporary_file_of_a_killed_writer_is_removed_by_the_next_write(readable_inputs, tmp_path):
    out = tmp_path / "f.h5"
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal, sys\n"
            "from plumbing.atomic import atomic_outputs\n"
            "with atomic_outputs(sys.argv[1]) as (temp,):\n"
            "    temp.write_bytes(b'half a file')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n",
            str(out),
        ],
        cwd=PROJECT_ROOT,
    )
    assert killed.returncode == -signal.SIGKILL
    assert len(temporaries(tmp_path)) == 1 and not out.exists()
    arguments = [
        "preprocessing.extract", str(readable_inputs["slide"]), str(readable_inputs["patches"]),
        "--encoder", FAST_ENCODER, "--workers", "0", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    done = run_module(arguments)
    assert done.returncode == 0, done.stderr[-2000:]
    assert temporaries(tmp_path) == []
    assert validate_features(out, readable_inputs["patches"], FAST_ENCODER) is None
