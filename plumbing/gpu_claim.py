"""One GPU per job: a job claims a free device before torch starts CUDA.

On a workstation with G GPUs, `snakemake --resources gpu=G` starts up to G GPU jobs at
once; without a claim every one of them would use `cuda:0`. Here each job takes the first
device whose lock file it can lock (`fcntl.flock` on `<lock dir>/gpu<index>.lock`, held
for the life of the process) and sets `CUDA_VISIBLE_DEVICES` to that device alone, so
torch's `cuda:0` is the claimed GPU. The kernel drops a flock when its process ends, how
ever it ends (SIGKILL included), so a killed job's device is free again at once; nothing
has to be cleaned up.

Which devices are claimed from, first found wins:
- `HMIL_GPU_DEVICES` (comma-separated indices, e.g. `0,1,2`): names the pool; tests use it
  as a fake device list on machines without GPUs, users to keep some GPUs out;
- under SLURM (`SLURM_JOB_ID` set) with `CUDA_VISIBLE_DEVICES` set: the scheduler chose
  the devices, they are kept as given and nothing is claimed;
- `CUDA_VISIBLE_DEVICES` set by the user: the pool is those devices;
- the NVIDIA GPUs of the machine (`/proc/driver/nvidia/gpus`, else `nvidia-smi -L`).

A job that finds every device of the pool claimed (more GPU jobs than GPUs, e.g. two
Snakemake runs on one machine, or `--resources gpu` above the GPU count) waits for one to
be freed, saying so in one log line, and then runs; with a timeout it fails with one line
instead. The lock folder is `HMIL_GPU_LOCK_DIR`, by default `<tmp>/hmil-gpu-locks-<uid>`:
one per user and machine.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from plumbing.errors import PipelineError

log = logging.getLogger("hmil.gpu")

DEVICES_ENV = "HMIL_GPU_DEVICES"
LOCK_DIR_ENV = "HMIL_GPU_LOCK_DIR"
NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")
POLL_SECONDS = 1.0


class GpuClaimError(PipelineError):
    """No GPU could be claimed (bad device list, unusable lock folder, timeout)."""


@dataclass(frozen=True)
class GpuPool:
    """The devices a job may use and where they come from.

    `devices`: the device indices (as CUDA_VISIBLE_DEVICES spells them); `scheduler`: True
    when a scheduler (SLURM) assigned them, so they are used as they are, never claimed."""

    devices: tuple[str, ...]
    source: str
    scheduler: bool = False


@dataclass
class GpuClaim:
    """A held device: `device` is its index; the claim lasts while `handle` is open."""

    device: str | None
    pool: GpuPool
    lock_path: Path | None = None
    handle: int | None = None

    def release(self) -> None:
        if self.handle is not None:
            os.close(self.handle)  # closing the descriptor drops the flock
            self.handle = None


def parse_devices(value: str, name: str) -> tuple[str, ...]:
    """`0,1,2` -> ("0", "1", "2"); one line naming the variable for anything else."""
    devices = tuple(part.strip() for part in value.split(",") if part.strip())
    if not all(d.isdigit() or d.startswith(("GPU-", "MIG-")) for d in devices):
        raise GpuClaimError(
            f"{name}={value!r}: expected comma-separated device indices such as 0,1,2"
        )
    if len(set(devices)) != len(devices):
        raise GpuClaimError(f"{name}={value!r}: a device is named twice")
    return devices


def machine_gpus() -> tuple[str, ...]:
    """Indices of the machine's NVIDIA GPUs, found without starting CUDA (which would fix
    the visible devices of this process before the claim)."""
    if NVIDIA_PROC.is_dir():
        return tuple(str(i) for i in range(len(list(NVIDIA_PROC.iterdir()))))
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ()
    lines = [line for line in listed.stdout.splitlines() if line.startswith("GPU ")]
    return tuple(str(i) for i in range(len(lines))) if listed.returncode == 0 else ()


def gpu_pool(env: Mapping[str, str] | None = None) -> GpuPool:
    """The devices a job may claim from (see the module docstring for the order)."""
    env = os.environ if env is None else env
    if env.get(DEVICES_ENV, "").strip():
        return GpuPool(parse_devices(env[DEVICES_ENV], DEVICES_ENV), DEVICES_ENV)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and env.get("SLURM_JOB_ID"):
        devices = tuple(d.strip() for d in visible.split(",") if d.strip())
        return GpuPool(devices, "SLURM (CUDA_VISIBLE_DEVICES)", scheduler=True)
    if visible is not None:
        if not visible.strip():
            return GpuPool((), "CUDA_VISIBLE_DEVICES (empty)")
        return GpuPool(parse_devices(visible, "CUDA_VISIBLE_DEVICES"), "CUDA_VISIBLE_DEVICES")
    return GpuPool(machine_gpus(), "this machine's NVIDIA GPUs")


def lock_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get(LOCK_DIR_ENV):
        return Path(env[LOCK_DIR_ENV])
    return Path(tempfile.gettempdir()) / f"hmil-gpu-locks-{os.getuid()}"


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive flock on `path`, or None if another holds it."""
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(handle)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    # who holds it, for a person looking at the folder (the lock is the flock, not this)
    os.ftruncate(handle, 0)
    os.write(handle, f"{os.getpid()}\n".encode())
    return handle


def claim_gpu(
    env: MutableMapping[str, str] | None = None,
    timeout: float | None = None,
    poll: float = POLL_SECONDS,
) -> GpuClaim:
    """Claim one free device of the pool and make it this process's only visible GPU.

    Sets `CUDA_VISIBLE_DEVICES` in `env` (the process environment by default); call it
    before anything starts CUDA. Returns a claim with `device` None when there is no GPU
    (the caller runs on the CPU). Under SLURM the scheduler's devices are kept as they are.
    Waits while every device is claimed; `timeout` (seconds) turns a long wait into an error.
    """
    env = os.environ if env is None else env
    pool = gpu_pool(env)
    if pool.scheduler or not pool.devices:
        return GpuClaim(None if not pool.devices else ",".join(pool.devices), pool)
    folder = lock_dir(env)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GpuClaimError(f"GPU lock folder {folder}: {err.strerror}") from None
    start, said = time.monotonic(), False
    while True:
        for device in pool.devices:
            path = folder / f"gpu{device}.lock"
            try:
                handle = _try_lock(path)
            except OSError as err:
                raise GpuClaimError(f"GPU lock file {path}: {err.strerror}") from None
            if handle is not None:
                env["CUDA_VISIBLE_DEVICES"] = device
                return GpuClaim(device, pool, path, handle)
        waited = time.monotonic() - start
        if timeout is not None and waited >= timeout:
            raise GpuClaimError(
                f"no free GPU after {waited:.0f} s: all of {','.join(pool.devices)} "
                f"({pool.source}) are claimed by other jobs (locks in {folder})"
            )
        if not said:
            log.info(
                "waiting for a free GPU: all of %s (%s) are claimed by other jobs "
                "(more GPU jobs than GPUs: lower --resources gpu)",
                ",".join(pool.devices), pool.source,
            )  # fmt: skip
            said = True
        time.sleep(poll)


# The claim of this process: kept referenced so its descriptor (and flock) lives as long
# as the process does.
_HELD: list[GpuClaim] = []


def claim_for_device(requested: str) -> GpuClaim | None:
    """The command-line edge: claim a GPU when `--device` may use one (`cuda`, `auto`),
    log which, and hold it for the rest of the process. `cpu` claims nothing."""
    if requested == "cpu":
        return None
    if _HELD:
        return _HELD[0]
    claim = claim_gpu()
    if claim.pool.scheduler:
        log.info("GPU %s: assigned by %s, kept as given", claim.device, claim.pool.source)
    elif claim.device is not None:
        log.info(
            "GPU %s of %s (%s) claimed for this job; CUDA_VISIBLE_DEVICES=%s",
            claim.device, ",".join(claim.pool.devices), claim.pool.source, claim.device,
        )  # fmt: skip
    _HELD.append(claim)
    return claim


def detected_gpu_count(env: Mapping[str, str] | None = None) -> int:
    """How many devices jobs on this machine can claim (the workflow compares it with
    `--resources gpu`)."""
    try:
        return len(gpu_pool(env).devices)
    except GpuClaimError:
        return 0
