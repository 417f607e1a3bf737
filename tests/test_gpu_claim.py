"""One GPU per job (plumbing.gpu_claim), on a CPU machine: HMIL_GPU_DEVICES names fake
devices, and concurrent processes stand for Snakemake's GPU jobs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from plumbing import gpu_claim
from plumbing.gpu_claim import GpuClaimError, claim_for_device, claim_gpu, gpu_pool

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# A GPU job: claim a device, print it, hold it until the file argv[1] exists.
JOB = """
import os, sys, time
from plumbing.gpu_claim import claim_gpu
claim_gpu(poll=0.05)
print(os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
"""


@pytest.fixture
def fake_gpus(tmp_path):
    """The environment of jobs on a machine whose GPUs are 0, 1, 2."""
    env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT_ROOT),
        gpu_claim.DEVICES_ENV: "0,1,2",
        gpu_claim.LOCK_DIR_ENV: str(tmp_path / "locks"),
    }
    env.pop("SLURM_JOB_ID", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def start_job(env: dict, release: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", JOB, str(release)], env=env, stdout=subprocess.PIPE, text=True
    )


def claimed_device(job: subprocess.Popen) -> str:
    return job.stdout.readline().strip()


def test_concurrent_jobs_each_get_their_own_device(fake_gpus, tmp_path):
    release = tmp_path / "release"
    jobs = [start_job(fake_gpus, release) for _ in range(3)]
    try:
        devices = [claimed_device(job) for job in jobs]
    finally:
        release.touch()
        for job in jobs:
            job.wait(timeout=30)
    assert sorted(devices) == ["0", "1", "2"]


def test_a_killed_jobs_device_is_free_again(fake_gpus, tmp_path):
    release = tmp_path / "release"
    jobs = [start_job(fake_gpus, release) for _ in range(3)]
    devices = [claimed_device(job) for job in jobs]
    env = dict(fake_gpus)
    with pytest.raises(GpuClaimError, match=r"no free GPU .* all of 0,1,2"):
        claim_gpu(env, timeout=0.2, poll=0.05)
    victim = devices.index("1")
    jobs[victim].send_signal(signal.SIGKILL)
    jobs[victim].wait(timeout=30)
    claim = claim_gpu(env, timeout=5, poll=0.05)
    try:
        assert claim.device == "1" and env["CUDA_VISIBLE_DEVICES"] == "1"
    finally:
        claim.release()
        release.touch()
        for job in jobs:
            job.wait(timeout=30)


def test_a_job_beyond_the_device_count_waits_for_a_free_one(fake_gpus, tmp_path):
    first, later = tmp_path / "first", tmp_path / "later"
    holders = [start_job(fake_gpus, first), *(start_job(fake_gpus, later) for _ in range(2))]
    held = [claimed_device(job) for job in holders]
    waiting = start_job(fake_gpus, later)
    try:
        first.touch()  # the first holder ends; the waiting job takes its device
        holders[0].wait(timeout=30)
        assert claimed_device(waiting) == held[0]
    finally:
        first.touch()
        later.touch()
        for job in [*holders, waiting]:
            job.wait(timeout=30)


def test_slurm_devices_are_kept_as_given(tmp_path):
    env = {"SLURM_JOB_ID": "42", "CUDA_VISIBLE_DEVICES": "3",
           gpu_claim.LOCK_DIR_ENV: str(tmp_path / "locks")}  # fmt: skip
    claim = claim_gpu(env)
    assert (claim.device, claim.pool.scheduler, claim.lock_path) == ("3", True, None)
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and not (tmp_path / "locks").exists()


def test_user_visible_devices_are_the_pool_outside_slurm():
    assert gpu_pool({"CUDA_VISIBLE_DEVICES": "2,3"}).devices == ("2", "3")
    assert gpu_pool({"CUDA_VISIBLE_DEVICES": ""}).devices == ()
    named = gpu_pool({gpu_claim.DEVICES_ENV: "5", "CUDA_VISIBLE_DEVICES": "2,3"})
    assert named.devices == ("5",)


@pytest.mark.parametrize("value", ["0,x", "0,0", "cuda:0"])
def test_a_bad_device_list_is_one_line_naming_the_variable(value):
    with pytest.raises(GpuClaimError, match=rf"^{gpu_claim.DEVICES_ENV}=") as error:
        gpu_pool({gpu_claim.DEVICES_ENV: value})
    assert "\n" not in str(error.value)


def test_no_gpu_claims_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_claim, "machine_gpus", lambda: ())
    env = {gpu_claim.LOCK_DIR_ENV: str(tmp_path / "locks")}
    claim = claim_gpu(env)
    assert claim.device is None and "CUDA_VISIBLE_DEVICES" not in env


def test_cpu_jobs_claim_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv(gpu_claim.DEVICES_ENV, "0")
    monkeypatch.setenv(gpu_claim.LOCK_DIR_ENV, str(tmp_path / "locks"))
    assert claim_for_device("cpu") is None
    assert not (tmp_path / "locks").exists()


def test_training_claims_its_gpu_before_torch_looks_for_cuda(fake_gpus, tmp_path):
    """`hmil.train --device cuda` claims a device first (its log says which); on this
    CPU machine torch then finds no CUDA and the run stops with one line."""
    done = subprocess.run(
        [sys.executable, "-m", "hmil.train", "--features", str(tmp_path), "--splits",
         str(tmp_path / "DATA_SPLIT.csv"), "--fold", "0", "--model", "abmil",
         "--hierarchy", "bracs", "--out", str(tmp_path / "run"), "--device", "cuda"],
        env=fake_gpus, capture_output=True, text=True,
    )  # fmt: skip
    lines = done.stderr.strip().splitlines()
    claimed = [line for line in lines if "claimed for this job" in line]
    assert len(claimed) == 1 and "GPU 0 of 0,1,2 (HMIL_GPU_DEVICES)" in claimed[0]
    assert lines[-1] == "error: --device cuda: no CUDA device is available"
