"""Patch encoders by name: build any registered encoder with its weights, record the weights.

Each entry (an `EncoderSpec` in `preprocessing.features.encoder_registry`) declares what a
caller needs before building anything: the input size and µm/px the encoder expects, its
normalisation, its output dimension and where its weights come from. Adding an encoder is one
`register(EncoderSpec(...))`. Names of the form `timm:<model>` give any timm model's pooled
features, with its own normalisation and `num_features`.

Weights (`build_encoder(name, weights)`): a checkpoint file (`.pth`/`.pt`/`.bin`/
`.safetensors`), `"random"` (tests and demos only), or None for the entry's default download.
Every output records where its weights came from (`weights_record`). Random weights are drawn
from a fixed seed (`RANDOM_WEIGHTS_SEED`), so two runs give identical features.

This module registers the built-in entries and imports `encoder_zoo`, which registers the
pathology foundation models (UNI2-h, Virchow2, H-optimus, Prov-GigaPath, Phikon-v2, ...), each
with the source of its numbers: importing it fills the registry, so look names up here.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import timm
import torch
from torch import nn

from plumbing.digests import file_sha256

# Imported for its entries: the zoo registers the foundation models.
from preprocessing.features import encoder_zoo  # noqa: F401
from preprocessing.features.encoder_checkpoints import (
    PublishedLayout,
    check_fits,
    first_sentence,
    load_checkpoint,
    read_state_dict,
)
from preprocessing.features.encoder_registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RANDOM_WEIGHTS,
    TIMM_PREFIX,
    EncoderError,
    EncoderSpec,
    get_encoder_spec,
    list_encoders,
    register,
)
from preprocessing.features.handcrafted import FEATURE_DIM as STAIN_TEXTURE_DIM
from preprocessing.features.handcrafted import StainTextureEncoder

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NO_WEIGHTS",
    "RANDOM_WEIGHTS",
    "RANDOM_WEIGHTS_SEED",
    "TIMM_PREFIX",
    "EncoderError",
    "EncoderSpec",
    "PublishedLayout",
    "TruncatedResNet",
    "build_encoder",
    "check_fits",
    "get_encoder_spec",
    "list_encoders",
    "load_checkpoint",
    "read_state_dict",
    "register",
    "weights_record",
]

log = logging.getLogger("hmil.encoders")

#: Seed of `--weights random`: recorded in every features file (`weights_seed`).
RANDOM_WEIGHTS_SEED = 0
NO_WEIGHTS = "none"  #: weights record of a weight-free encoder


class TruncatedResNet(nn.Module):
    """ResNet stem and layers 1-3, then global average pooling: CLAM's `resnet50_trunc`.

    The submodules keep torchvision/timm names (`conv1`, `layer3.5.bn2`, ...) so full ResNet
    checkpoints load once their `layer4.*` and `fc.*` keys are dropped.
    """

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.conv1, self.bn1, self.act1 = resnet.conv1, resnet.bn1, resnet.act1
        self.maxpool = resnet.maxpool
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3
        self.num_features = resnet.layer3[-1].conv3.out_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(images))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))


register(
    EncoderSpec(
        name="resnet50_trunc",
        architecture="resnet50",
        feature_dim=1024,
        pretrained="resnet50.tv_in1k",
        ignored_prefixes=("layer4.", "fc."),
        adapt=TruncatedResNet,
    )
)
register(
    EncoderSpec(
        name="uni",
        architecture="vit_large_patch16_224",
        timm_kwargs={"init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
        feature_dim=1024,
        pretrained="hf-hub:MahmoodLab/uni",
        ignored_prefixes=("head.",),
    )
)


register(
    EncoderSpec(
        name="stain_texture",
        architecture="",
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        feature_dim=STAIN_TEXTURE_DIM,
        builder=StainTextureEncoder,
    )
)


def weights_record(spec: EncoderSpec, weights: str | Path | None) -> str:
    """What outputs record: `random`, `file:<name>:sha256:<16 hex>`, the download source, or
    `none` for a weight-free encoder."""
    if spec.builder is not None:
        return NO_WEIGHTS
    if weights is None:
        return _default_source(spec)
    if str(weights) == RANDOM_WEIGHTS:
        return RANDOM_WEIGHTS
    path = _checkpoint_path(weights)
    return f"file:{path.name}:sha256:{file_sha256(path)[:16]}"


def _default_source(spec: EncoderSpec) -> str:
    if spec.pretrained is None:
        raise EncoderError(
            f"encoder {spec.name} has no default weights; give --weights PATH or --weights random"
        )
    return spec.pretrained if spec.pretrained.startswith("hf-hub:") else f"timm:{spec.pretrained}"


def _checkpoint_path(weights: str | Path) -> Path:
    path = Path(weights)
    if not path.is_file():
        problem = "is a folder, not a checkpoint" if path.is_dir() else "weights file not found"
        raise EncoderError(f"{path}: {problem} (give a checkpoint file or --weights random)")
    return path


def build_encoder(
    name: str | EncoderSpec, weights: str | Path | None = None
) -> tuple[nn.Module, EncoderSpec, str]:
    """Build encoder `name` in eval mode with its weights: (model, spec, weights record).

    The model maps normalised float images (B, 3, S, S) to features (B, spec.feature_dim).
    An `EncoderSpec` instead of a name builds a variant that is not registered (the tests
    build billion-parameter entries one block deep).
    """
    spec = name if isinstance(name, EncoderSpec) else get_encoder_spec(name)
    name = spec.name
    if spec.builder is not None:
        if weights is not None and str(weights) != RANDOM_WEIGHTS:
            raise EncoderError(f"encoder {name} has no weights; do not give --weights {weights}")
        return spec.builder().eval(), spec, NO_WEIGHTS
    record = weights_record(spec, weights)
    if weights is None:
        model = _download_pretrained(spec)
    elif record == RANDOM_WEIGHTS:
        # A fixed seed on a forked generator: the same weights in every run, and the caller's
        # random stream untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            if spec.create is not None:
                model = spec.create(spec, RANDOM_WEIGHTS)
            else:
                model = _create(spec, spec.architecture, pretrained=False)
        log.warning(
            "encoder %s has RANDOM weights (seed %d): its features are meaningless "
            "(tests/demo only)",
            name,
            RANDOM_WEIGHTS_SEED,
        )
    elif spec.create is not None:
        model = spec.create(spec, _checkpoint_path(weights))
    else:
        model = _create_from_checkpoint(spec, Path(weights))
    model.eval().requires_grad_(False)
    dim = int(getattr(model, "num_features", spec.feature_dim))
    if dim != spec.feature_dim:
        raise EncoderError(
            f"encoder {name} gives {dim}-d features, its spec says {spec.feature_dim}"
        )
    return model, replace(spec, feature_dim=dim), record


def _create(spec: EncoderSpec, source: str, pretrained: bool) -> nn.Module:
    model = timm.create_model(source, pretrained=pretrained, **spec.timm_kwargs)
    return spec.adapt(model) if spec.adapt is not None else model


def _download_pretrained(spec: EncoderSpec) -> nn.Module:
    source = _default_source(spec)
    try:  # timm takes both `<model>.<tag>` and `hf-hub:<repo>`
        if spec.create is not None:
            return spec.create(spec, None)
        return _create(spec, spec.pretrained, pretrained=True)
    except EncoderError:
        raise  # a missing optional package says so itself
    except Exception as err:  # offline, gated repo, proxy, cache: each library raises its own
        reason = first_sentence(err)
        raise EncoderError(
            f"encoder {spec.name}: cannot get its default weights {source} "
            f"({type(err).__name__}{': ' + reason if reason else ''}); give a local "
            "checkpoint with --weights PATH, or --weights random for a test run"
        ) from None


def _create_from_checkpoint(spec: EncoderSpec, path: Path) -> nn.Module:
    """Build on the meta device and adopt the checkpoint's tensors: no random initialisation
    (seconds for a ViT-L), and a checkpoint that does not fit fails before any allocation."""
    with torch.device("meta"):
        model = _create(spec, spec.architecture, pretrained=False)
    load_checkpoint(model, path, spec, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        # Non-persistent buffers are not in checkpoints: build for real and copy into it.
        model = _create(spec, spec.architecture, pretrained=False)
        load_checkpoint(model, path, spec)
    return model
