"""The weight-free stain_texture encoder: shape, registry entry, and that it sees what differs."""

import re
from pathlib import Path

import pytest
import torch
import yaml

from preprocessing.features.encoders import EncoderError, build_encoder, list_encoders
from preprocessing.features.handcrafted import FEATURE_DIM, StainTextureEncoder

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def test_gives_its_dimension_and_is_deterministic():
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    encoder = StainTextureEncoder()
    features = encoder(images)
    assert features.shape == (5, FEATURE_DIM)
    assert torch.isfinite(features).all()
    assert torch.equal(features, encoder(images))


def test_separates_stains_darkness_and_texture():
    pale_pink = torch.tensor([0.9, 0.7, 0.8]).view(1, 3, 1, 1).expand(1, 3, 64, 64)
    dark_purple = torch.tensor([0.45, 0.25, 0.55]).view(1, 3, 1, 1).expand(1, 3, 64, 64)
    checker = ((torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2).float()
    textured = pale_pink * (0.6 + 0.4 * checker)
    features = StainTextureEncoder()(torch.cat([pale_pink, dark_purple, textured]))
    # Mean colour is the first three features; darkness fractions come before texture.
    assert torch.allclose(features[0, :3], torch.tensor([0.9, 0.7, 0.8]))
    dark_fraction = features[:, FEATURE_DIM - 8]  # gray < 0.3
    assert dark_fraction[1] == 0 and dark_fraction[0] == 0
    gray_below_45 = features[:, FEATURE_DIM - 7]
    assert gray_below_45[1] == 1 and gray_below_45[0] == 0
    texture = features[:, FEATURE_DIM - 5]  # finest gradient energy
    assert texture[0] == 0 and texture[1] == 0 and texture[2] > 0.1


def test_registry_entry_is_weight_free():
    model, spec, record = build_encoder("stain_texture")
    assert record == "none" and spec.feature_dim == FEATURE_DIM
    assert model(torch.rand(2, 3, 224, 224)).shape == (2, FEATURE_DIM)
    with pytest.raises(EncoderError, match="has no weights"):
        build_encoder("stain_texture", "/models/uni.bin")


def test_config_schema_accepts_every_registered_encoder():
    schema = yaml.safe_load(
        (PROJECT_ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text()
    )
    pattern = schema["properties"]["encoders"]["items"]["pattern"]
    for name in [*list_encoders(), "timm:vit_small_patch16_224"]:
        assert re.match(pattern, name), name
    # any name may be imported (features.dirs); extraction checks it against the registry
    for unsafe in ("../uni", "uni net", "uni/v2", ""):
        assert not re.match(pattern, unsafe), unsafe
