"""Training-step speed and peak memory of every MIL model, beside the original designs.

    python benchmarks/bench_mil_models.py [--sizes 1000 10000 100000] [--threads 2]
        [--in-dim 1024] [--models ...] [--device cpu cuda]

One training step = forward of one bag [N, D] + the model's loss + backward + Adam step,
fp32, as ``hmil.train`` runs it (MHIM models: teacher pass and masking included). Models
run interleaved (one step of each in turn, then the next repeat) so a busy machine slows
them alike; the table gives the median step time, bags/s and the peak memory of a step
(CPU: peak resident memory above the resident memory before the step, via
/proc/self/clear_refs; CUDA: peak allocated memory).

``ref_abmil``, ``ref_transmil`` and ``ref_dsmil`` are the original implementations'
designs, written here for the comparison (no code of theirs is copied):
- ref_abmil: the ABMIL of the MHIM-MIL/CLAM code bases: Linear(D, 512)-ReLU, attention
  Linear(512, 128)-Tanh-Linear(128, 1), softmax over instances, Linear(512, C).
- ref_transmil: TransMIL with the reference Nyström package's algorithm: zero tokens
  padded in front to a multiple of 256, landmark sums / segment length, three explicit
  softmax maps, (attn1 @ attn2⁺) @ (attn3 @ V), three separate PPEG convolutions. If the
  ``nystrom_attention`` package is importable it is used instead of this re-statement.
- ref_dsmil: DSMIL as published: a full sort of the instance scores for the critical
  instances, the query projection run again on them, identity values.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

# Large tensors must go back to the OS when freed, or resident memory cannot show the
# peak of one step: fix glibc's mmap threshold (read at process start), then re-exec.
if sys.platform == "linux" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    os.execv(sys.executable, [sys.executable, *sys.argv])
# Idle OpenMP threads sleep instead of spinning: on a shared, busy machine spinning threads
# make 2-thread steps several times slower (measured 9–29 s against 2.7 s for one step).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("KMP_BLOCKTIME", "0")

import torch
import torch.nn.functional as F
from torch import nn

from hmil.models import create_model
from hmil.models.mhim import MHIM
from hmil.training.losses import HMILLoss, LossConfig

OURS = [
    "abmil",
    "clam_sb",
    "clam_mb",
    "transmil",
    "dsmil",
    "mhim_abmil",
    "mhim_transmil",
    "mhim_dsmil",
]
REFERENCES = {"ref_abmil": "abmil", "ref_transmil": "transmil", "ref_dsmil": "dsmil"}
REPEATS = {1_000: 5, 10_000: 3, 100_000: 1}  # and one warm-up step below 100k


# ---- the original designs, for the side-by-side comparison -----------------------------------


class RefABMIL(nn.Module):
    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.embedding = nn.Sequential(nn.Linear(in_dim, 512), nn.ReLU())
        self.attention = nn.Sequential(nn.Linear(512, 128), nn.Tanh(), nn.Linear(128, 1))
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        instances = self.embedding(bag)
        attention = torch.softmax(self.attention(instances).transpose(0, 1), dim=1)
        return {"bag": self.classifier(attention @ instances).squeeze(0)}


def reference_pinv(matrix: torch.Tensor, iterations: int) -> torch.Tensor:
    magnitude = matrix.abs()
    scale = magnitude.sum(dim=-1).max() * magnitude.sum(dim=-2).max()  # over all heads
    inverse = matrix.transpose(-1, -2) / scale
    eye = torch.eye(matrix.shape[-1], device=matrix.device)
    for _ in range(iterations):
        product = matrix @ inverse
        inverse = 0.25 * inverse @ (13 * eye - product @ (15 * eye - product @ (7 * eye - product)))
    return inverse


class RefNystrom(nn.Module):
    def __init__(self, dim: int = 512, heads: int = 8, head_dim: int = 64, landmarks: int = 256):
        super().__init__()
        self.heads, self.head_dim, self.landmarks = heads, head_dim, landmarks
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, dim)
        self.residual = nn.Conv2d(heads, heads, (33, 1), padding=(16, 0), groups=heads, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [1, n, dim]
        length, landmarks = tokens.shape[1], self.landmarks
        if length % landmarks:
            tokens = F.pad(tokens, (0, 0, landmarks - length % landmarks, 0))
        padded = tokens.shape[1]
        q, k, v = (
            self.qkv(tokens).view(1, padded, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )
        q = q * self.head_dim**-0.5
        segment = math.ceil(length / landmarks)
        q_landmarks = q.reshape(1, self.heads, landmarks, segment, -1).sum(dim=3) / segment
        k_landmarks = k.reshape(1, self.heads, landmarks, segment, -1).sum(dim=3) / segment
        attn1 = torch.softmax(q @ k_landmarks.transpose(-1, -2), dim=-1)
        attn2 = torch.softmax(q_landmarks @ k_landmarks.transpose(-1, -2), dim=-1)
        attn3 = torch.softmax(q_landmarks @ k.transpose(-1, -2), dim=-1)
        out = (attn1 @ reference_pinv(attn2, 6)) @ (attn3 @ v) + self.residual(v)
        out = self.out(out.permute(0, 2, 1, 3).reshape(1, padded, -1))
        return out[:, -length:]


def nystrom_layer(dim: int) -> nn.Module:
    """The reference package's NystromAttention when installed, else the re-statement."""
    try:
        from nystrom_attention import NystromAttention as PackageNystrom
    except ImportError:
        return RefNystrom(dim)
    return PackageNystrom(
        dim=dim, dim_head=64, heads=8, num_landmarks=256, pinv_iterations=6, residual=True
    )


class RefTransMIL(nn.Module):
    def __init__(self, in_dim: int, num_classes: int, dim: int = 512) -> None:
        super().__init__()
        self.embedding = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.class_token = nn.Parameter(torch.randn(1, 1, dim))
        self.norm1, self.norm2, self.norm = (nn.LayerNorm(dim) for _ in range(3))
        self.layer1, self.layer2 = nystrom_layer(dim), nystrom_layer(dim)
        self.conv7 = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.conv5 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.conv3 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        instances = self.embedding(bag).unsqueeze(0)
        count = instances.shape[1]
        side = math.ceil(math.sqrt(count))
        instances = torch.cat([instances, instances[:, : side * side - count]], dim=1)
        tokens = torch.cat([self.class_token, instances], dim=1)
        tokens = tokens + self.layer1(self.norm1(tokens))
        grid = tokens[:, 1:].transpose(1, 2).reshape(1, -1, side, side)
        grid = self.conv7(grid) + grid + self.conv5(grid) + self.conv3(grid)
        tokens = torch.cat([tokens[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
        tokens = tokens + self.layer2(self.norm2(tokens))
        return {"bag": self.classifier(self.norm(tokens)[0, 0])}


class RefDSMIL(nn.Module):
    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.instance_classifier = nn.Linear(in_dim, num_classes)
        self.query = nn.Sequential(
            nn.Linear(in_dim, 128), nn.ReLU(), nn.Linear(128, 128), nn.Tanh()
        )
        self.bag_classifier = nn.Conv1d(num_classes, num_classes, kernel_size=in_dim)

    def forward(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        instance_logits = self.instance_classifier(bag)
        queries = self.query(bag)
        _, order = torch.sort(instance_logits, 0, descending=True)
        critical_queries = self.query(torch.index_select(bag, 0, order[0]))
        attention = torch.softmax(
            queries @ critical_queries.transpose(0, 1) / math.sqrt(queries.shape[1]), dim=0
        )
        slots = attention.transpose(0, 1) @ bag
        bag_logits = self.bag_classifier(slots.unsqueeze(0)).view(-1)
        return {"bag": bag_logits, "max": instance_logits.max(dim=0).values}


def reference_model(name: str, in_dim: int, num_classes: int) -> nn.Module:
    return {"ref_abmil": RefABMIL, "ref_transmil": RefTransMIL, "ref_dsmil": RefDSMIL}[name](
        in_dim, num_classes
    )


# ---- timing ----------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    model: nn.Module
    step: Callable[[torch.Tensor], None]  # one training step on a bag


def make_case(name: str, in_dim: int, num_fine: int, membership: torch.Tensor, device) -> Case:
    label = torch.tensor([1], device=device)
    if name in REFERENCES:
        model = reference_model(name, in_dim, num_fine).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step(bag: torch.Tensor) -> None:
            optimizer.zero_grad(set_to_none=True)
            logits = model(bag)
            loss = F.cross_entropy(logits["bag"].unsqueeze(0), label)
            if "max" in logits:  # DSMIL: 0.5·CE(bag) + 0.5·CE(max instance)
                loss = 0.5 * loss + 0.5 * F.cross_entropy(logits["max"].unsqueeze(0), label)
            loss.backward()
            optimizer.step()

        return Case(name, model, step)

    model = create_model(name, in_dim, (num_fine, membership.shape[1])).to(device).train()
    config = LossConfig.preset(getattr(model, "loss_preset", "flat"))
    if isinstance(model, MHIM):
        config = replace(config, consistency=model.config.cl_alpha)
    loss_fn = HMILLoss(membership, num_epochs=10, config=config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-4)

    def step(bag: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn([model(bag)], label, epoch=1)["total"].backward()
        optimizer.step()
        if isinstance(model, MHIM):
            model.after_optimizer_step()

    return Case(name, model, step)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measured_step(case: Case, bag: torch.Tensor) -> tuple[float, float]:
    """Seconds and peak MiB of one step."""
    gc.collect()
    if bag.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak resident size to the current one
        before = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    case.step(bag)
    if bag.is_cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    return time.perf_counter() - start, (peak - before) / 2**20


def run(args: argparse.Namespace, device: torch.device) -> None:
    membership = torch.zeros(args.num_fine, 3)
    membership[torch.arange(args.num_fine), torch.arange(args.num_fine) % 3] = 1.0
    membership = membership.to(device)
    torch.manual_seed(0)
    cases = [
        make_case(name, args.in_dim, args.num_fine, membership, device) for name in args.models
    ]
    print(f"\n{device.type}: D = {args.in_dim}, C = {args.num_fine}, fp32", flush=True)
    print(f"{'model':<15}{'N':>8}{'ms/step':>11}{'bags/s':>9}{'peak MiB':>10}{'vs ref':>8}")
    for size in args.sizes:
        bag = torch.randn(size, args.in_dim, device=device)
        repeats = args.repeats or REPEATS.get(size, 1)
        warmup = 0 if size >= 100_000 else 1
        times: dict[str, list[float]] = {case.name: [] for case in cases}
        peaks: dict[str, float] = {case.name: 0.0 for case in cases}
        for repeat in range(warmup + repeats):
            for case in cases:  # interleaved: one step of each model per round
                seconds, peak = measured_step(case, bag)
                peaks[case.name] = max(peaks[case.name], peak)
                if repeat >= warmup:
                    times[case.name].append(seconds)
        medians = {name: statistics.median(values) for name, values in times.items()}
        for name, seconds in medians.items():
            reference = next((ref for ref, ours in REFERENCES.items() if ours == name), None)
            ratio = f"{medians[reference] / seconds:6.2f}x" if reference in medians else ""
            print(
                f"{name:<15}{size:>8}{seconds * 1e3:>11.1f}{1 / seconds:>9.2f}"
                f"{peaks[name]:>10.0f}{ratio:>8}",
                flush=True,
            )
        del bag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--in-dim", type=int, default=1024)
    parser.add_argument("--num-fine", type=int, default=7, help="C_f (BRACS: 7)")
    parser.add_argument("--models", nargs="+", default=[*OURS, *REFERENCES])
    parser.add_argument("--repeats", type=int, default=None, help="default: 5 / 3 / 1 by N")
    parser.add_argument("--device", nargs="+", default=["cpu", "cuda"], choices=("cpu", "cuda"))
    args = parser.parse_args()
    unknown = sorted(set(args.models) - set(OURS) - set(REFERENCES))
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; vs ref = reference time / ours")
    for device_name in args.device:
        if device_name == "cuda" and not torch.cuda.is_available():
            print("\ncuda: no CUDA device, skipped")
            continue
        run(args, torch.device(device_name))


if __name__ == "__main__":
    main()
