"""Training cost of the MIL models per bag size: throughput (bags/s) and peak memory.

    python benchmarks/bench_training.py [--models hmil abmil] [--sizes 1000 10000 100000]
        [--dim 1024] [--batch-bags 2] [--device cpu|cuda|all] [--threads T]

One optimiser step = B whole bags of N instances forwarded, the training loss computed
(for ``hmil`` the method's total, contrastive term included, at epoch E/2 where every
term has a non-zero weight; ``flat`` fine cross-entropy for baselines), backward, Adam
step: what ``hmil.train`` does per batch. Each (model, N, device) runs in a fresh child
process, so one size's allocations cannot inflate another's peak.

Peak memory is the growth during the steps over the memory held before them (model,
optimiser state and input bags already allocated): on CUDA from
``torch.cuda.max_memory_allocated``; on CPU from the kernel's resident-set high-water mark
(VmHWM, reset through /proc/self/clear_refs before the steps; glibc is told to return
large freed blocks at once), since tracemalloc does not see torch's allocations.
time/N and memory/N per size show whether cost is linear in N: constant columns mean
linear, a column growing with N would mean an N×N term.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIERARCHY = "bracs"  # 7 fine classes in 3 coarse groups, as in the paper
NUM_EPOCHS = 200  # the paper's E; steps are taken at e = E/2
MMAP_THRESHOLD = 1 << 16  # bytes: blocks from 64 KiB up are mmapped (see run_child)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["hmil", "abmil"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1_000, 10_000, 100_000])
    parser.add_argument("--dim", type=int, default=1024, help="feature dimension D (UNI: 1024)")
    parser.add_argument("--batch-bags", type=int, default=2, help="bags per optimiser step")
    parser.add_argument(
        "--device", choices=("cpu", "cuda", "all"), default="all", help="all: cpu, and cuda if any"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); on a machine shared with other jobs use 1, "
        "as threads that wait for a descheduled peer make steps several times slower",
    )
    parser.add_argument(
        "--min-seconds", type=float, default=3.0, help="time steps until this much has passed"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---- child: one (model, N, device) ------------------------------------------------------------


def resident_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in KiB."""
    status = Path("/proc/self/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0])


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure(args: argparse.Namespace) -> dict:
    import torch

    from hmil.data.hierarchy import load_hierarchy
    from hmil.models import create_model
    from hmil.training.loop import autocast_context
    from hmil.training.losses import HMILLoss, LossConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    hierarchy = load_hierarchy(HIERARCHY)
    model = create_model(args.model, in_dim=args.dim, hierarchy=hierarchy).to(device)
    model.train()
    with torch.no_grad():
        flat = model(torch.zeros(2, args.dim, device=device)).coarse_logits is None
    loss_fn = HMILLoss(
        hierarchy.membership_tensor(),
        num_epochs=NUM_EPOCHS,
        config=LossConfig.preset(getattr(model, "loss_preset", "flat" if flat else "hmil")),
    ).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    bags = [torch.randn(args.size, args.dim, device=device) for _ in range(args.batch_bags)]
    # Bags of different labels: the contrastive loss sees negatives (other bags) and
    # positives (the other class slots of the same bag).
    fine_labels = torch.arange(args.batch_bags, device=device) % hierarchy.num_fine

    def step() -> None:
        with autocast_context(device):
            outputs = [model(bag) for bag in bags]
            total = loss_fn(outputs, fine_labels, epoch=NUM_EPOCHS // 2)["total"]
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    def synchronise() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Adam's state exists after the first step; take it before the baseline so that the
    # peak counts only what a step allocates and frees (activations, gradients).
    step()
    optimizer.zero_grad(set_to_none=True)
    synchronise()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        peak_reset = reset_peak_rss()
        baseline = resident_kib("VmRSS") * 1024
    step()  # warm-up (allocator caches, kernels); its peak counts, its time does not
    synchronise()
    times = []
    started = time.perf_counter()
    while len(times) < 2 or time.perf_counter() - started < args.min_seconds:
        begin = time.perf_counter()
        step()
        synchronise()
        times.append(time.perf_counter() - begin)
    if device.type == "cuda":
        peak_growth = torch.cuda.max_memory_allocated() - baseline
    else:
        peak_growth = resident_kib("VmHWM") * 1024 - baseline if peak_reset else math.nan
    seconds = min(times)  # the least disturbed step: others share this machine
    return {
        "model": args.model,
        "device": args.device,
        "n": args.size,
        "dim": args.dim,
        "batch_bags": args.batch_bags,
        "threads": torch.get_num_threads(),
        "steps": len(times),
        "step_seconds": seconds,
        "bags_per_second": args.batch_bags / seconds,
        "peak_bytes": peak_growth,
        "input_bytes": args.batch_bags * args.size * args.dim * 4,
    }


# ---- parent: one child per configuration, then the table --------------------------------------


def run_child(args: argparse.Namespace, model: str, size: int, device: str) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--model", model,
        "--size", str(size),
        "--device", device,
        "--dim", str(args.dim),
        "--batch-bags", str(args.batch_bags),
        "--min-seconds", str(args.min_seconds),
    ]  # fmt: skip
    if args.threads:
        command += ["--threads", str(args.threads)]
    # A fixed mmap threshold (which also turns off glibc's adaptive one) makes every large
    # block go back to the OS when freed, so the RSS before a step does not hide memory
    # that the previous step freed into the heap and the next one reuses.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no message"]
        raise SystemExit(f"error: {model} N={size} on {device} failed: {tail[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(results: list[dict]) -> None:
    header = (
        f"{'model':<7}{'device':<7}{'N':>8}{'bags/s':>10}{'s/step':>9}"
        f"{'µs/inst':>9}{'peak MiB':>10}{'KiB/inst':>10}{'time/N ×':>10}{'mem/N ×':>9}"
    )
    print(header)
    print("-" * len(header))
    first: dict[tuple[str, str], dict] = {}
    for row in results:
        instances = row["n"] * row["batch_bags"]
        per_instance_time = row["step_seconds"] / instances
        per_instance_memory = row["peak_bytes"] / instances
        reference = first.setdefault((row["model"], row["device"]), row)
        ref_instances = reference["n"] * reference["batch_bags"]
        time_ratio = per_instance_time / (reference["step_seconds"] / ref_instances)
        memory_ratio = per_instance_memory / (reference["peak_bytes"] / ref_instances)
        print(
            f"{row['model']:<7}{row['device']:<7}{row['n']:>8}{row['bags_per_second']:>10.2f}"
            f"{row['step_seconds']:>9.3f}{per_instance_time * 1e6:>9.2f}"
            f"{row['peak_bytes'] / 2**20:>10.1f}{per_instance_memory / 1024:>10.2f}"
            f"{time_ratio:>10.2f}{memory_ratio:>9.2f}"
        )
    print(
        "\nµs/inst, KiB/inst: per instance of the step's B bags; 'time/N ×', 'mem/N ×': "
        "relative to the smallest N (≈ 1 at every N: linear)."
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return 0
    import torch

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            raise SystemExit("error: --device cuda: no CUDA device is available")
        devices.remove("cuda")
    print(
        f"D = {args.dim}, B = {args.batch_bags} bags per step, hierarchy {HIERARCHY}, "
        f"CPU threads {args.threads or torch.get_num_threads()}"
        + (f", GPU {torch.cuda.get_device_name()}" if "cuda" in devices else ", no GPU"),
        flush=True,
    )
    results = []
    for device in devices:
        for model in args.models:
            for size in sorted(args.sizes):
                row = run_child(args, model, size, device)
                print(
                    f"  {model} {device} N={size}: {row['bags_per_second']:.2f} bags/s, "
                    f"peak +{row['peak_bytes'] / 2**20:.0f} MiB",
                    flush=True,
                )
                results.append(row)
    print()
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
