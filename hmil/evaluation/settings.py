"""The evaluation and deployment settings, each declared once as a field: its type,
default, bounds and one-line help. The key of the workflow config's ``evaluation`` section
is the field's name; the commands' options (:func:`plumbing.cli.add_options`) and the words
the workflow's rules pass (:func:`plumbing.settings.option_words`) follow from them, and a
test holds the schema's ``evaluation`` section equal to them.

- :class:`BootstrapSettings`: the patient bootstrap ``hmil.evaluate`` and ``hmil.deploy``
  both compute (:mod:`hmil.evaluation.metrics`), so the same options, defaults and help;
- :class:`DeploySettings`: those, and the device ``hmil.deploy`` runs the models on;
- :class:`HeatmapSettings`: how ``hmil.heatmaps`` draws (its options are older than the
  config keys, hence their own flags).

Which runs, cohorts and folders a command reads and writes are not settings: they are its
config (:class:`~hmil.evaluation.cross_validation.EvaluationConfig`,
:class:`~hmil.evaluation.deploy_inputs.DeployConfig`). Standard library only: the workflow
imports this module when it plans the jobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from plumbing.settings import Bounded, option


@dataclass(frozen=True, kw_only=True)
class BootstrapSettings:
    """The percentile bootstrap of the pooled metrics, resampling patients."""

    bootstrap: int = field(
        default=1000,
        metadata=option(
            "bootstrap resamples of patients (0: no CI)", parse=Bounded(int, minimum=0)
        ),
    )
    seed: int = field(default=0, metadata=option("seed of the bootstrap", parse=int))


@dataclass(frozen=True, kw_only=True)
class DeploySettings(BootstrapSettings):
    """A deployment's bootstrap, and where its fold models run."""

    # not in the workflow config: its deploy jobs ask for no GPU
    device: str = field(default="cpu", metadata=option("torch device", choices=("cpu", "cuda")))


@dataclass(frozen=True, kw_only=True)
class HeatmapSettings:
    """The size of the heatmap thumbnails and of the top-attention montages."""

    heatmap_top_k: int = field(
        default=16,
        metadata=option(
            "patches in each top-attention montage", flag="--top-k", parse=Bounded(int, minimum=1)
        ),
    )
    heatmap_size: int = field(
        default=1024,
        metadata=option(
            "longest side of each heatmap thumbnail, px",
            flag="--thumbnail-size",
            parse=Bounded(int, minimum=1),
        ),
    )
