"""The encoder registry: dimensions, truncation, checkpoint layouts and weight errors, offline."""

from __future__ import annotations

import hashlib

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file

from plumbing.errors import PipelineError
from preprocessing.features.encoders import (
    EncoderError,
    build_encoder,
    get_encoder_spec,
    list_encoders,
    weights_record,
)

SMALL = "timm:resnet10t"  # 5 M parameters: fast where the encoder's identity does not matter
#: Entries of encoders.py itself; the foundation models of encoder_zoo.py have their own tests.
CORE_ENCODERS = ["resnet50_trunc", "uni", "stain_texture"]


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A resnet10t state dict on disk and the model it came from."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=0).eval()
    path = tmp_path_factory.mktemp("weights") / "resnet10t.pth"
    torch.save(model.state_dict(), path)
    return path, model


def one_line(message: str) -> bool:
    return "\n" not in message and len(message) < 400


@pytest.mark.parametrize("name", [*CORE_ENCODERS, SMALL, "timm:vit_tiny_patch16_224"])
def test_every_encoder_builds_offline_and_gives_its_declared_dimension(name):
    spec = get_encoder_spec(name)
    batch = 1 if name == "uni" else 2  # ViT-L: 300 M parameters
    model, built, record = build_encoder(name, "random")
    images = torch.rand(batch, 3, spec.input_size, spec.input_size)
    with torch.inference_mode():
        features = model(images)
    assert record == ("none" if spec.builder is not None else "random")
    assert features.shape == (batch, spec.feature_dim) == (batch, built.feature_dim)
    assert torch.isfinite(features).all()
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_registry_declares_the_input_contract():
    assert {"resnet50_trunc", "uni"} <= set(list_encoders())
    resnet, uni = get_encoder_spec("resnet50_trunc"), get_encoder_spec("uni")
    assert (resnet.feature_dim, uni.feature_dim) == (1024, 1024)
    assert resnet.input_size == uni.input_size == 224 and resnet.mpp == uni.mpp == 0.5
    assert resnet.pretrained == "resnet50.tv_in1k" and uni.pretrained == "hf-hub:MahmoodLab/uni"
    assert uni.timm_kwargs == {"init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True}
    # timm: dimension and normalisation come from the model and its pretrained config
    vit = get_encoder_spec("timm:vit_tiny_patch16_224")
    assert vit.feature_dim == 192 and vit.mean == (0.5, 0.5, 0.5) and vit.input_size == 224
    assert get_encoder_spec(SMALL).feature_dim == 512


def test_unknown_encoder_is_one_line_listing_the_known_names():
    with pytest.raises(PipelineError) as err:
        get_encoder_spec("resnet51")
    message = str(err.value)
    assert one_line(message) and "'resnet51'" in message
    assert "resnet50_trunc" in message and "uni" in message and "timm:" in message
    with pytest.raises(EncoderError, match="not a timm model"):
        get_encoder_spec("timm:no_such_net")


def test_resnet50_trunc_is_layer3_of_resnet50_average_pooled(tmp_path):
    torch.manual_seed(1)
    full = timm.create_model("resnet50").eval()
    path = tmp_path / "resnet50_full.pth"
    torch.save(full.state_dict(), path)  # a whole ResNet: layer4 and fc must be dropped
    truncated, spec, _ = build_encoder("resnet50_trunc", path)
    images = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        reference = full.forward_intermediates(images, indices=[3], intermediates_only=True)[0]
        features = truncated(images)
    assert reference.shape == (2, 1024, 14, 14)  # layer3: stride 16, 1024 channels
    torch.testing.assert_close(features, reference.mean(dim=(2, 3)))
    assert spec.feature_dim == 1024


@pytest.mark.parametrize(
    "layout", ["plain", "nested_model", "nested_state_dict_ddp", "safetensors"]
)
def test_checkpoint_layouts_load_the_same_weights(small_checkpoint, tmp_path, layout):
    source, reference = small_checkpoint
    state = torch.load(source, weights_only=True)
    if layout == "plain":
        path = tmp_path / "w.bin"
        torch.save(state, path)
    elif layout == "nested_model":
        path = tmp_path / "w.pt"
        torch.save({"model": state, "epoch": 3}, path)
    elif layout == "nested_state_dict_ddp":
        path = tmp_path / "w.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model, _, record = build_encoder(SMALL, path)
    images = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(model(images), reference(images), rtol=0, atol=0)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert record == f"file:{path.name}:sha256:{digest}"
    assert all(not t.is_meta for t in model.state_dict().values())


def test_wrong_architecture_checkpoint_is_one_clear_line(small_checkpoint):
    path, _ = small_checkpoint
    with pytest.raises(EncoderError) as err:
        build_encoder("uni", path)
    message = str(err.value)
    assert one_line(message), message
    assert message.startswith(f"{path}: checkpoint does not fit encoder uni (")
    assert "missing keys e.g. 'cls_token'" in message and "unexpected keys e.g." in message


def test_shape_mismatch_is_counted_and_named(small_checkpoint, tmp_path):
    source, _ = small_checkpoint
    state = torch.load(source, weights_only=True)
    state["conv1.0.weight"] = torch.zeros(8, 3, 3, 3)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    with pytest.raises(EncoderError) as err:
        build_encoder(SMALL, path)
    message = str(err.value)
    assert one_line(message)
    assert "1 shape mismatches e.g. 'conv1.0.weight' (8, 3, 3, 3) vs (24, 3, 3, 3)" in message
    assert "missing" not in message


def test_missing_folder_and_corrupt_weights_are_one_line(tmp_path):
    with pytest.raises(EncoderError, match="weights file not found") as err:
        build_encoder(SMALL, tmp_path / "nowhere.pth")
    assert one_line(str(err.value)) and "nowhere.pth" in str(err.value)
    with pytest.raises(EncoderError, match="is a folder"):
        build_encoder(SMALL, tmp_path)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint" * 100)
    with pytest.raises(EncoderError, match="not a readable checkpoint") as err:
        build_encoder(SMALL, corrupt)
    assert one_line(str(err.value))


@pytest.mark.parametrize("name", ["resnet50_trunc", "uni"])
def test_default_weights_offline_say_how_to_provide_them(monkeypatch, name):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EncoderError) as err:
        build_encoder(name)
    message = str(err.value)
    assert one_line(message), message
    assert get_encoder_spec(name).pretrained in message
    assert "--weights PATH" in message and "--weights random" in message


def test_random_weights_are_recorded_and_warned(caplog):
    assert weights_record(get_encoder_spec(SMALL), "random") == "random"
    assert weights_record(get_encoder_spec("uni"), None) == "hf-hub:MahmoodLab/uni"
    assert weights_record(get_encoder_spec("resnet50_trunc"), None) == "timm:resnet50.tv_in1k"
    with caplog.at_level("WARNING", logger="hmil.encoders"):
        build_encoder(SMALL, "random")
    assert any("RANDOM weights" in r.message and r.levelname == "WARNING" for r in caplog.records)
