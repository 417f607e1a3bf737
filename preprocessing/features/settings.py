"""The extraction settings a user sets, each declared once as a field of
:class:`ExtractSettings`: its default, its option of ``python -m preprocessing.extract``
(help, how it is read) and its key in the workflow config's ``features`` section, the
field's name (:mod:`plumbing.settings`). What a run resolves from them for its device is
:class:`~preprocessing.features.extraction.ExtractParams`. Standard library only: the
workflow reads it when it plans the jobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from plumbing.settings import Bounded, non_negative, option

#: Stored feature types.
DTYPES = ("float32", "float16")
#: A slide with more of its patches unreadable than this is failed, not just degraded.
DEFAULT_MAX_UNREADABLE_FRACTION = 0.1


@dataclass(frozen=True)
class ExtractSettings:
    """How a run asks to encode (None: resolved for the device by the run)."""

    batch_size: int = field(
        default=64, metadata=option("patches per forward pass", parse=Bounded(int, minimum=1))
    )
    workers: int | None = field(
        default=None,
        metadata=option(
            "reader processes (default: 1 on CPU; on GPU all CPUs but one, up to 16)",
            parse=non_negative,
        ),
    )
    device: str = field(
        default="auto",
        metadata=option(
            "auto: CUDA when present; cuda is an error where there is none",
            choices=("auto", "cpu", "cuda"),
        ),
    )
    precision: str = field(
        default="auto",
        metadata=option(
            "auto: bf16 autocast on CUDA, fp32 on CPU", choices=("auto", "fp32", "bf16", "fp16")
        ),
    )
    dtype: str | None = field(
        default=None, metadata=option("stored feature type (default float32)", choices=DTYPES)
    )
    # not in the workflow config: the workflow's strict mode chooses it
    on_bad_patch: str = field(
        default="fail",
        metadata=option(
            "unreadable tile: fail (default) or leave the patch out and record it",
            choices=("fail", "skip"),
        ),
    )
    max_unreadable_fraction: float = field(
        default=DEFAULT_MAX_UNREADABLE_FRACTION,
        metadata=option(
            "with --on-bad-patch skip: a slide with more of its patches unreadable is "
            f"recorded as failed (default {DEFAULT_MAX_UNREADABLE_FRACTION})",
            parse=Bounded(float, minimum=0, maximum=1),
        ),
    )
