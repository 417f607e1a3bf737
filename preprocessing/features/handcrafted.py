"""A weight-free colour and texture encoder: real features when no checkpoint can be had.

Deep encoders need weights that cannot be downloaded here; random weights give features
with (almost) no information about the slide, so a demo trained on them learns nothing.
This encoder describes a patch by statistics pathologists' stains are known to vary in
(colour, optical density, darkness of nuclei, texture at a few scales). It is cheap on a
CPU and deterministic, which makes it the demo's and the tests' encoder; it is no
substitute for a foundation model on real cohorts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HISTOGRAM_BINS = 8
DARK_THRESHOLDS = (0.3, 0.45, 0.6)
TEXTURE_SCALES = (1, 2, 4)
BLOB_POOLS = (4, 8)
FEATURE_DIM = (
    3 * 4 + 3 * HISTOGRAM_BINS + 4 + len(DARK_THRESHOLDS) + len(TEXTURE_SCALES) + len(BLOB_POOLS)
)


class StainTextureEncoder(nn.Module):
    """[B, 3, H, W] RGB in [0, 1] → [B, FEATURE_DIM] colour/texture statistics.

    Everything is a batched tensor operation (no loop over patches or pixels).
    """

    num_features = FEATURE_DIM

    def __init__(self) -> None:
        super().__init__()
        edges = torch.linspace(0, 1, HISTOGRAM_BINS + 1)[1:-1]
        self.register_buffer("edges", edges, persistent=False)
        luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        self.register_buffer("luma", luma, persistent=False)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        rgb = rgb.float().clamp(0, 1)
        batch = rgb.shape[0]
        flat = rgb.flatten(2)  # [B, 3, P]
        density = -torch.log(flat.clamp_min(1 / 255))  # optical density per channel
        bins = torch.bucketize(flat.contiguous(), self.edges)  # [B, 3, P] in 0..bins-1
        histogram = F.one_hot(bins, HISTOGRAM_BINS).float().mean(dim=2)  # [B, 3, bins]

        high, low = flat.max(dim=1).values, flat.min(dim=1).values
        saturation = (high - low) / high.clamp_min(1e-3)
        red_blue = flat[:, 0] - flat[:, 2]

        gray = (rgb * self.luma).sum(dim=1, keepdim=True)  # [B, 1, H, W]
        gray_flat = gray.flatten(1)
        dark = torch.stack([(gray_flat < t).float().mean(dim=1) for t in DARK_THRESHOLDS], 1)
        texture = torch.stack([_gradient_energy(gray, scale) for scale in TEXTURE_SCALES], 1)
        blobs = torch.stack(
            [
                (F.avg_pool2d(gray, pool) < DARK_THRESHOLDS[1]).float().flatten(1).mean(dim=1)
                for pool in BLOB_POOLS
            ],
            1,
        )
        return torch.cat(
            [
                flat.mean(dim=2),
                flat.std(dim=2),
                density.mean(dim=2),
                density.std(dim=2),
                histogram.reshape(batch, -1),
                torch.stack(
                    [saturation.mean(1), saturation.std(1), red_blue.mean(1), red_blue.std(1)], 1
                ),
                dark,
                texture,
                blobs,
            ],
            dim=1,
        )


def _gradient_energy(gray: torch.Tensor, scale: int) -> torch.Tensor:
    """Mean absolute finite difference of the image average-pooled by `scale`: [B]."""
    image = F.avg_pool2d(gray, scale) if scale > 1 else gray
    dx = (image[..., :, 1:] - image[..., :, :-1]).abs().flatten(1).mean(dim=1)
    dy = (image[..., 1:, :] - image[..., :-1, :]).abs().flatten(1).mean(dim=1)
    return dx + dy
