"""Pathology foundation models as registry entries (`preprocessing.features.encoder_registry`).

Every number of an entry (architecture arguments, input size, µm/px, mean/std, pooling,
output dimension, hub id) comes from the model's card or its published configuration; the
comment above each entry names the source. Where a card gives no pixel size, the entry says
so and uses 0.5 µm/px (20×), the magnification these models were mostly trained at.

timm builds most of them; two need `transformers` (the optional `encoders` extra), and a model
that neither can build (CONCH v1.5) is registered so that asking for it says what to do.
CTransPath is not registered: its only definition is a frozen 2022 fork of timm (`timm_ctp`),
which no maintained package provides.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from timm.layers import SwiGLUPacked
from torch import nn

from preprocessing.features.encoder_checkpoints import PublishedLayout, check_fits
from preprocessing.features.encoder_registry import (
    RANDOM_WEIGHTS,
    EncoderError,
    EncoderSpec,
    register,
)

HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)
TRANSFORMERS_EXTRA = "encoders"


class ClassTokenAndPatchMean(PublishedLayout):
    """Virchow's tile embedding: the class token concatenated with the mean of the patch
    tokens, register tokens left out: (B, 3, S, S) → (B, 2·D).

    timm's pooling options give one or the other, not both; the ViT is kept unchanged under
    `model.` so Paige's checkpoints load as published.
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.model = vit
        self.num_features = 2 * vit.embed_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(images)  # (B, 1 + registers + patches, D), normed
        patches = tokens[:, self.model.num_prefix_tokens :]
        return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)


class HFClassToken(PublishedLayout):
    """A `transformers` vision model's class token after the final norm: (B, 3, S, S) → (B, D)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.num_features = int(model.config.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).last_hidden_state[:, 0]


def _transformers_class(spec: EncoderSpec):
    try:
        import transformers
    except ImportError:
        raise EncoderError(
            f"encoder {spec.name} needs the `transformers` package: "
            f'pip install -c constraints.txt -e ".[{TRANSFORMERS_EXTRA}]"'
        ) from None
    return getattr(transformers, spec.architecture)


def create_hf_class_token(spec: EncoderSpec, weights: str | Path | None) -> nn.Module:
    """A `transformers` model (class `spec.architecture`, config `spec.timm_kwargs`) with its
    weights: random, the hub's (`spec.pretrained`), or the folder of a saved model.

    A checkpoint is read with `from_pretrained` from the folder holding it (its `config.json`
    beside it), because `transformers` renames old checkpoints' keys on loading; the result is
    then checked tensor by tensor against the entry's architecture, so a checkpoint of another
    model fails with one line instead of loading with random leftovers.
    """
    model_class = _transformers_class(spec)
    config = model_class.config_class(**spec.timm_kwargs)
    if weights == RANDOM_WEIGHTS:
        return HFClassToken(model_class(config))
    if weights is None:  # no trust_remote_code: the entry's own class, no code from the hub
        return HFClassToken(model_class.from_pretrained(spec.pretrained.removeprefix("hf-hub:")))
    path = Path(weights)
    try:
        model = model_class.from_pretrained(path.parent, local_files_only=True)
    except Exception as err:  # missing config.json, size mismatch: transformers raises many
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise EncoderError(
            f"{path}: not a saved {spec.architecture} of encoder {spec.name} ({reason}); "
            "give the model file inside the folder that holds its config.json"
        ) from None
    with torch.device("meta"):
        expected = model_class(config).state_dict()
    check_fits(expected, dict(model.state_dict()), spec, path)
    return HFClassToken(model)


def create_unavailable(reason: str):
    """`create` of an entry that cannot be built here: one line saying why and what to do."""

    def create(spec: EncoderSpec, weights: str | Path | None) -> nn.Module:
        raise EncoderError(f"encoder {spec.name} cannot be built here: {reason}")

    return create


# UNI2-h, ViT-H/14 with 8 register tokens, SwiGLU, 1536-d class token; 224 px at 20×, ImageNet
# mean/std. Source: the timm_kwargs of the MahmoodLab/UNI2-h model card (gated, read here as
# quoted by the README of github.com/mahmoodlab/UNI and by UNIv2InferenceEncoder in
# mahmoodlab/TRIDENT trident/patch_encoder_models/load.py).
register(
    EncoderSpec(
        name="uni2_h",
        architecture="vit_giant_patch14_224",
        timm_kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "num_classes": 0,
            "no_embed_class": True,
            "mlp_layer": SwiGLUPacked,
            "act_layer": nn.SiLU,
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        feature_dim=1536,
        pretrained="hf-hub:MahmoodLab/UNI2-h",
        ignored_prefixes=("head.",),
    )
)

# Virchow2, ViT-H/14 (32 blocks, 1280 wide) with 4 register tokens, SwiGLU; embedding = class
# token ⊕ mean of the patch tokens (tokens 5:), 2 × 1280 = 2560-d; 224 px, ImageNet mean/std;
# trained on mixed magnifications, 20× used here. Source: the paige-ai/Virchow2 model card
# (gated; its create_model call with SwiGLUPacked/SiLU and "output[:, 0]", "output[:, 5:]" as
# quoted by code that uses it), arXiv:2408.00738, and the kwargs of Virchow2InferenceEncoder
# in mahmoodlab/TRIDENT load.py.
#: ViT-H/14 with SwiGLU as both Virchow models build it (v2 adds 4 register tokens).
_VIRCHOW_KWARGS = {
    "img_size": 224,
    "init_values": 1e-5,
    "num_classes": 0,
    "mlp_ratio": 5.3375,
    "global_pool": "",
    "dynamic_img_size": True,
    "mlp_layer": SwiGLUPacked,
    "act_layer": nn.SiLU,
}
register(
    EncoderSpec(
        name="virchow2",
        architecture="vit_huge_patch14_224",
        timm_kwargs={**_VIRCHOW_KWARGS, "reg_tokens": 4},
        feature_dim=2560,
        pretrained="hf-hub:paige-ai/Virchow2",
        ignored_prefixes=("head.",),
        adapt=ClassTokenAndPatchMean,
    )
)

# Virchow (v1): as Virchow2 without register tokens (patch tokens 1:), 2560-d. Source:
# paige-ai/Virchow model card; VirchowInferenceEncoder of mahmoodlab/TRIDENT.
register(
    EncoderSpec(
        name="virchow",
        architecture="vit_huge_patch14_224",
        timm_kwargs=_VIRCHOW_KWARGS,
        feature_dim=2560,
        pretrained="hf-hub:paige-ai/Virchow",
        ignored_prefixes=("head.",),
        adapt=ClassTokenAndPatchMean,
    )
)

# H-optimus-0, ViT-g/14 (40 blocks, 1536 wide, SwiGLU) with 4 register tokens, 1536-d class
# token; "224x224 ... at 0.5 microns per pixel", its own mean/std. Source: bioptimus/H-optimus-0
# model card (create_model(..., init_values=1e-5, dynamic_img_size=False), Normalize), its
# config.json (architecture, global_pool "token", num_features 1536) and
# preprocessor_config.json (image_mean/image_std).
H_OPTIMUS_0 = register(
    EncoderSpec(
        name="h_optimus_0",
        architecture="vit_giant_patch14_reg4_dinov2",
        timm_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "global_pool": "token",
            "dynamic_img_size": False,
        },
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        feature_dim=1536,
        pretrained="hf-hub:bioptimus/H-optimus-0",
        ignored_prefixes=("head.",),
    )
)

# H-optimus-1: H-optimus-0's architecture, input and mean/std, new weights. Source:
# bioptimus/H-optimus-1 (not readable here: gated), HOptimus1InferenceEncoder of
# mahmoodlab/TRIDENT (same kwargs and Normalize constants as H-optimus-0).
register(replace(H_OPTIMUS_0, name="h_optimus_1", pretrained="hf-hub:bioptimus/H-optimus-1"))

# Prov-GigaPath tile encoder: DINOv2 ViT-g with 16 px patches (40 blocks, 1536 wide, SwiGLU
# from timm's vit_giant_patch14_dinov2), 1536-d class token; 256 px tiles at 0.5 µm/px
# resized to 256 and centre-cropped to 224 by the card (here: the tile read at 224), ImageNet
# mean/std. Source: GigaPathInferenceEncoder of mahmoodlab/TRIDENT load.py (the kwargs it
# builds for a local checkpoint and the card's Resize 256 / CenterCrop 224 transform); the
# gated prov-gigapath/prov-gigapath card and config were not readable here.
register(
    EncoderSpec(
        name="prov_gigapath",
        architecture="vit_giant_patch14_dinov2",
        timm_kwargs={
            "img_size": 224,
            "in_chans": 3,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "init_values": 1e-5,
            "mlp_ratio": 5.33334,
            "num_classes": 0,
        },
        feature_dim=1536,
        pretrained="hf-hub:prov-gigapath/prov-gigapath",
        ignored_prefixes=("head.",),
    )
)

# Phikon-v2: DINOv2 ViT-L/16 without registers (24 blocks, 1024 wide), 1024-d class token of
# last_hidden_state; 224 px at 20× (0.5 µm/px), ImageNet mean/std. Needs `transformers`.
# Source: owkin/phikon-v2 model card (AutoModel, last_hidden_state[:, 0, :]), arXiv:2409.09173
# (ViT-L/16, tiles 224 px at 20×); Phikonv2InferenceEncoder of mahmoodlab/TRIDENT.
register(
    EncoderSpec(
        name="phikon_v2",
        architecture="Dinov2Model",
        timm_kwargs={
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "patch_size": 16,
            "image_size": 224,
            "mlp_ratio": 4,
            "layer_norm_eps": 1e-6,
        },
        feature_dim=1024,
        pretrained="hf-hub:owkin/phikon-v2",
        create=create_hf_class_token,
    )
)

# Hibou-L: DINOv2 ViT-L/14 with 4 register tokens (24 blocks, 1024 wide), 1024-d class token
# (the card's pooler_output); 224 px, its own mean/std; the card gives no pixel size (0.5 µm/px
# assumed). Needs `transformers`; built as transformers' Dinov2WithRegistersModel, not the
# card's trust_remote_code class (no code from the hub is run). Source: histai/hibou-L card and
# github.com/HistAI/hibou README ("customized DINOv2 ... support for registers"),
# arXiv:2406.05074; HIBOU_MEAN/STD and HibouLInferenceEncoder of mahmoodlab/TRIDENT.
register(
    EncoderSpec(
        name="hibou_l",
        architecture="Dinov2WithRegistersModel",
        timm_kwargs={
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "patch_size": 14,
            "image_size": 224,
            "num_register_tokens": 4,
            "mlp_ratio": 4,
            "layer_norm_eps": 1e-6,
        },
        mean=HIBOU_MEAN,
        std=HIBOU_STD,
        feature_dim=1024,
        pretrained="hf-hub:histai/hibou-L",
        create=create_hf_class_token,
    )
)

# CONCH v1.5 (the patch encoder of TITAN): a ViT-L/16 trunk at 448 px with CONCH's attentional
# pooler and a 768-d output, ImageNet mean/std. Its trunk and pooler are custom code (einops),
# not a timm or transformers architecture. Source: CONCHVisionTower and
# create_model_from_pretrained in mahmoodlab/TRIDENT model_zoo/conchv1_5/conchv1_5.py.
register(
    EncoderSpec(
        name="conch_v1_5",
        architecture="",
        input_size=448,
        feature_dim=768,
        pretrained="hf-hub:MahmoodLab/conchv1_5",
        create=create_unavailable(
            "its ViT-L/16 with CONCH's attentional pooler is not a timm or transformers model; "
            "extract its features with TRIDENT (encoder conch_v15) and import them"
        ),
    )
)
