"""The pathology foundation-model entries: model-card contracts, offline builds, checkpoints.

Billion-parameter entries are built whole on the meta device (module tree and shapes, no
memory) and computed one block deep with random weights: the same key names and widths as the
published checkpoints, in seconds on a CPU.
"""

from __future__ import annotations

import builtins
from dataclasses import replace

import pytest
import timm
import torch

from preprocessing.features.encoder_zoo import ClassTokenAndPatchMean
from preprocessing.features.encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderError,
    PublishedLayout,
    build_encoder,
    get_encoder_spec,
    list_encoders,
)

HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)

#: name: (feature_dim, input_size, mpp, (mean, std), hub id), from the model cards.
CONTRACTS = {
    "uni2_h": (1536, 224, 0.5, IMAGENET, "hf-hub:MahmoodLab/UNI2-h"),
    "virchow2": (2560, 224, 0.5, IMAGENET, "hf-hub:paige-ai/Virchow2"),
    "virchow": (2560, 224, 0.5, IMAGENET, "hf-hub:paige-ai/Virchow"),
    "h_optimus_0": (1536, 224, 0.5, HOPTIMUS, "hf-hub:bioptimus/H-optimus-0"),
    "h_optimus_1": (1536, 224, 0.5, HOPTIMUS, "hf-hub:bioptimus/H-optimus-1"),
    "prov_gigapath": (1536, 224, 0.5, IMAGENET, "hf-hub:prov-gigapath/prov-gigapath"),
    "phikon_v2": (1024, 224, 0.5, IMAGENET, "hf-hub:owkin/phikon-v2"),
    "hibou_l": (1024, 224, 0.5, HIBOU, "hf-hub:histai/hibou-L"),
}
#: name: (blocks, width, patch px, register tokens), from the model cards (not from timm).
ARCHITECTURES = {
    "uni2_h": (24, 1536, 14, 8),
    "virchow2": (32, 1280, 14, 4),
    "virchow": (32, 1280, 14, 0),
    "h_optimus_0": (40, 1536, 14, 4),
    "h_optimus_1": (40, 1536, 14, 4),
    "prov_gigapath": (40, 1536, 16, 0),
    "phikon_v2": (24, 1024, 16, 0),
    "hibou_l": (24, 1024, 14, 4),
}
HF_ENTRIES = {"phikon_v2", "hibou_l"}


def test_every_registered_encoder_is_tested():
    core = {"resnet50_trunc", "uni", "stain_texture"}  # tests/preprocessing/test_encoders.py
    assert set(list_encoders()) == core | set(CONTRACTS) | {"conch_v1_5"}


def one_block(name: str):
    """The entry one transformer block deep: published key names, a fraction of the size."""
    spec = get_encoder_spec(name)
    depth_key = "num_hidden_layers" if name in HF_ENTRIES else "depth"
    return replace(spec, timm_kwargs={**spec.timm_kwargs, depth_key: 1})


def published_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What the model's authors publish: the inner model, without our pooling wrapper."""
    return model.model.state_dict() if isinstance(model, PublishedLayout) else model.state_dict()


def architecture_of(encoder: torch.nn.Module) -> tuple[int, int, int, int]:
    """(blocks, width, patch px, register tokens) of a built encoder."""
    inner = encoder.model if isinstance(encoder, PublishedLayout) else encoder
    if hasattr(inner, "config"):  # transformers
        config = inner.config
        registers = getattr(config, "num_register_tokens", 0)
        return len(inner.encoder.layer), config.hidden_size, config.patch_size, registers
    patch = inner.patch_embed.patch_size[0]
    return len(inner.blocks), inner.embed_dim, patch, inner.num_reg_tokens


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_entry_declares_its_model_card_contract(name):
    spec = get_encoder_spec(name)
    dim, size, mpp, (mean, std), hub = CONTRACTS[name]
    assert (spec.feature_dim, spec.input_size, spec.mpp) == (dim, size, mpp)
    assert spec.mean == pytest.approx(mean) and spec.std == pytest.approx(std)
    assert spec.pretrained == hub


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_entry_builds_whole_on_meta_with_the_card_architecture_and_dimension(name):
    spec = get_encoder_spec(name)
    with torch.device("meta"):
        model, built, record = build_encoder(name, "random")
        features = model(torch.zeros(2, 3, spec.input_size, spec.input_size))
    assert record == "random" and built.feature_dim == spec.feature_dim
    assert features.shape == (2, spec.feature_dim)
    assert architecture_of(model) == ARCHITECTURES[name]


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_entry_encodes_two_patches_with_seeded_random_weights(name):
    spec = one_block(name)
    model, _, _ = build_encoder(spec, "random")
    again, _, _ = build_encoder(spec, "random")
    images = torch.rand(2, 3, spec.input_size, spec.input_size)
    with torch.inference_mode():
        features = model(images)
        repeated = again(images)
    assert features.shape == (2, spec.feature_dim) and torch.isfinite(features).all()
    assert torch.equal(features, repeated)  # --weights random: the same weights every time
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_checkpoint_with_the_published_key_names_loads(name, tmp_path):
    spec = one_block(name)
    torch.manual_seed(3)  # weights that differ from the seeded random ones
    reference, _, _ = build_encoder(spec, "random")
    for parameter in reference.parameters():
        parameter.data.normal_(0, 0.02)
    if name in HF_ENTRIES:  # transformers models travel as a folder with config.json
        reference.model.save_pretrained(tmp_path)
        path = tmp_path / "model.safetensors"
    else:
        path = tmp_path / f"{name}.bin"
        # a classifier head left in a published checkpoint is dropped, not an error
        state = {**published_state_dict(reference), "head.weight": torch.zeros(2, 3)}
        torch.save(state, path)
    loaded, _, record = build_encoder(spec, path)
    images = torch.rand(2, 3, spec.input_size, spec.input_size)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(images), reference(images), rtol=0, atol=0)
    assert record.startswith(f"file:{path.name}:sha256:")


@pytest.mark.parametrize(
    ("source", "target", "expected"),
    [
        ("h_optimus_0", "uni2_h", "missing keys e.g. 'blocks.1."),  # deeper target
        ("uni2_h", "prov_gigapath", "unexpected keys e.g. 'reg_token'"),
        ("h_optimus_0", "prov_gigapath", "shape mismatches e.g. 'pos_embed'"),
    ],
)
def test_checkpoint_of_another_architecture_is_one_line(source, target, expected, tmp_path):
    model, _, _ = build_encoder(one_block(source), "random")
    path = tmp_path / f"{source}.pth"
    torch.save(published_state_dict(model), path)
    with pytest.raises(EncoderError) as err:
        build_encoder(target, path)  # the full target, on the meta device: no allocation
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message
    assert message.startswith(f"{path}: checkpoint does not fit encoder {target} (")
    assert expected in message


def test_transformers_checkpoint_of_another_architecture_is_one_line(tmp_path):
    phikon, _, _ = build_encoder(one_block("phikon_v2"), "random")
    phikon.model.save_pretrained(tmp_path)
    with pytest.raises(EncoderError) as err:
        build_encoder(one_block("hibou_l"), tmp_path / "model.safetensors")
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message
    assert "model.safetensors" in message and "hibou_l" in message


def test_virchow_pooling_is_class_token_and_mean_of_patch_tokens_without_registers():
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_small_patch16_224", reg_tokens=4, global_pool="", num_classes=0, depth=2
    ).eval()
    pooled = ClassTokenAndPatchMean(vit)
    images = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        tokens = vit(images)  # (2, 1 + 4 + 196, 384): what the Virchow2 card calls `output`
        expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(dim=1)], dim=-1)
        torch.testing.assert_close(pooled(images), expected)
    assert tokens.shape == (2, 201, 384) and pooled.num_features == 768


def test_conch_v1_5_says_in_one_line_why_it_cannot_be_built():
    spec = get_encoder_spec("conch_v1_5")
    assert (spec.input_size, spec.feature_dim) == (448, 768)
    with pytest.raises(EncoderError) as err:
        build_encoder("conch_v1_5", "random")
    message = str(err.value)
    assert "\n" not in message and "conch_v1_5" in message and "TRIDENT" in message


def test_missing_transformers_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(EncoderError) as err:
        build_encoder("phikon_v2", "random")
    message = str(err.value)
    assert "\n" not in message and "transformers" in message and '".[encoders]"' in message


@pytest.mark.parametrize("name", ["virchow2", "phikon_v2"])
def test_hub_weights_offline_are_one_line(monkeypatch, name):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderError) as err:
        build_encoder(name)
    message = str(err.value)
    assert "\n" not in message and get_encoder_spec(name).pretrained in message
    assert "--weights PATH" in message
