"""The encoder registry: names → `EncoderSpec`, the input contract of every patch encoder.

A leaf (timm's `_registry.py` shape): it imports no other module of the package, so entry
modules (`encoders`, `encoder_zoo`) import it and register into it without a circle. The
registry is full once `preprocessing.features.encoders` is imported, which imports every
entry module; callers look names up through that module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from torch import nn

from plumbing.errors import PipelineError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_WEIGHTS = "random"
TIMM_PREFIX = "timm:"


class EncoderError(PipelineError):
    """An encoder cannot be named, built or given its weights."""


@dataclass(frozen=True)
class EncoderSpec:
    """What a patch encoder expects and gives; the input contract of `preprocessing.extract`."""

    name: str
    architecture: str  #: timm model name (or the class name `create` builds)
    #: Architecture arguments: timm `create_model` kwargs, or the config of `create`.
    timm_kwargs: Mapping = field(default_factory=dict, hash=False)
    input_size: int = 224  #: square input, px
    mpp: float = 0.5  #: µm/px the encoder was trained at
    mean: tuple[float, float, float] = IMAGENET_MEAN  #: on [0, 1] RGB
    std: tuple[float, float, float] = IMAGENET_STD
    feature_dim: int = 0  #: length of one patch's feature vector
    pretrained: str | None = None  #: default weights: timm tag or `hf-hub:<repo>`
    #: Checkpoint keys that the encoder drops on purpose (classifier, truncated stages).
    ignored_prefixes: tuple[str, ...] = ()
    #: Turns the timm model into the encoder (truncation, pooling); identity when None.
    adapt: Callable[[nn.Module], nn.Module] | None = field(default=None, compare=False)
    #: Builds a weight-free encoder (no timm model, no checkpoint); None for timm encoders.
    builder: Callable[[], nn.Module] | None = field(default=None, compare=False)
    #: Builds a non-timm encoder with its weights, `create(spec, weights)` with weights None
    #: (download), `"random"` or a checkpoint Path (e.g. a `transformers` model); None for timm.
    create: Callable[[EncoderSpec, str | Path | None], nn.Module] | None = field(
        default=None, compare=False
    )


_REGISTRY: dict[str, EncoderSpec] = {}


def register(spec: EncoderSpec) -> EncoderSpec:
    """Add `spec` under its name; a name taken (or of the `timm:` form) is a ValueError."""
    if spec.name in _REGISTRY or spec.name.startswith(TIMM_PREFIX):
        raise ValueError(f"encoder name {spec.name!r} is taken")
    _REGISTRY[spec.name] = spec
    return spec


def list_encoders() -> list[str]:
    """Registered names; any `timm:<model>` is accepted as well."""
    return sorted(_REGISTRY)


def get_encoder_spec(name: str) -> EncoderSpec:
    """The spec of `name` with `feature_dim` known (timm models are sized on the meta device)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith(TIMM_PREFIX):
        return _timm_spec(name)
    known = ", ".join(list_encoders())
    raise EncoderError(f"unknown encoder {name!r}; known: {known}, or timm:<any timm model>")


def _timm_spec(name: str) -> EncoderSpec:
    architecture = name[len(TIMM_PREFIX) :]
    if not timm.is_model(architecture):
        raise EncoderError(f"unknown encoder {name!r}: {architecture!r} is not a timm model")
    # The meta device builds the module tree without allocating or initialising weights.
    with torch.device("meta"):
        model = timm.create_model(architecture, pretrained=False, num_classes=0)
    cfg = model.pretrained_cfg
    size = cfg.get("test_input_size") or cfg.get("input_size") or (3, 224, 224)
    classifier = cfg.get("classifier")
    classifiers = classifier if isinstance(classifier, (list, tuple)) else (classifier,)
    return EncoderSpec(
        name=name,
        architecture=architecture,
        timm_kwargs={"num_classes": 0},
        input_size=int(size[-1]),
        mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),
        feature_dim=int(model.num_features),
        pretrained=architecture,
        ignored_prefixes=tuple(f"{c}." for c in classifiers if c),
    )
