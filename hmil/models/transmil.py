"""TransMIL (Shao et al., NeurIPS 2021): a two-layer Nyström transformer over the instances.

For one bag X [N, D]:

    H = ReLU(W X)                          [N, 512]
    pad H to a square: append copies of its first s² − N rows (s = ⌈√N⌉)
    T = [class token; H]                   [1 + s², 512]
    T = T + NystromAttention(LayerNorm(T))            layer 1
    T = PPEG(T)                            depthwise 7×7 + 5×5 + 3×3 convs + identity on the
                                           s × s grid of instance tokens (class token kept)
    T = T + NystromAttention(LayerNorm(T))            layer 2
    z = classifier(LayerNorm(T)[0])        class token → fine logits

Nyström attention (Xiong et al. 2021): 8 heads × 64, 256 landmarks (segment means of the
queries and keys), Moore–Penrose inverse by 6 iterations, plus a depthwise convolution of
the values along the sequence (kernel 33). Differences from the reference package, each
for speed or exactness, none changing the architecture:
- the products run as attn1 @ (attn2⁺ @ (attn3 @ V)), never forming an [n, m]·[m, m]
  product, and the two softmax–value products are fused attention kernels
  (``scaled_dot_product_attention``), so memory stays linear in N without [n, m] maps;
- a sequence of at most 256 tokens uses exact softmax attention (with every token as its
  own landmark Nyström is exact anyway); longer ones use segment means over ⌈n/256⌉
  consecutive tokens, the last segment averaging only real tokens — no zero tokens take
  part in any softmax.

Attention map (``fine_attention`` [1, N]): the class token's softmax attention over the
tokens in the last layer (``attention_layer``), averaged over heads — the exact row that
Nyström approximates, computed in O(N) — with each padding copy's weight added to the
instance it copies, renormalised over the N instances.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hmil.models.layers import check_bag
from hmil.models.output import MILOutput
from hmil.models.registry import register_model


def iterative_pinv(matrix: torch.Tensor, iterations: int) -> torch.Tensor:
    """Moore–Penrose inverse of each [m, m] matrix of ``matrix`` [..., m, m] by Razavi et
    al.'s iteration Z ← ¼ Z (13 I − A Z (15 I − A Z (7 I − A Z))), from Z₀ = Aᵀ/(‖A‖₁‖A‖∞)."""
    magnitude = matrix.abs()
    norm_1 = magnitude.sum(dim=-2).amax(dim=-1)  # max column sum
    norm_inf = magnitude.sum(dim=-1).amax(dim=-1)  # max row sum
    inverse = matrix.transpose(-1, -2) / (norm_1 * norm_inf)[..., None, None]
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    for _ in range(iterations):
        product = matrix @ inverse
        inverse = 0.25 * inverse @ (13 * eye - product @ (15 * eye - product @ (7 * eye - product)))
    return inverse


def segment_means(sequence: torch.Tensor, segment: int) -> torch.Tensor:
    """[..., ⌈n/segment⌉, d] means of consecutive segments of ``sequence`` [..., n, d]; the
    last segment may be shorter and averages only its own tokens."""
    length = sequence.shape[-2]
    num_segments = math.ceil(length / segment)
    padded = F.pad(sequence, (0, 0, 0, num_segments * segment - length))
    sums = padded.unflatten(-2, (num_segments, segment)).sum(dim=-2)
    counts = torch.full((num_segments, 1), float(segment), dtype=sums.dtype, device=sums.device)
    counts[-1] = length - (num_segments - 1) * segment
    return sums / counts


class NystromAttention(nn.Module):
    """Multi-head Nyström self-attention over one sequence [T, dim] → [T, dim].

    Args:
        dim: token width. heads, head_dim: 8 × 64.
        num_landmarks: 256. pinv_iterations: 6.
        residual_kernel: length of the depthwise value convolution along the sequence (33).
        dropout: after the output projection; off by default.
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        head_dim: int = 64,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.out = nn.Sequential(nn.Linear(heads * head_dim, dim), nn.Dropout(dropout))
        self.residual = nn.Conv2d(
            heads,
            heads,
            (residual_kernel, 1),
            padding=(residual_kernel // 2, 0),
            groups=heads,
            bias=False,
        )

    def forward(
        self, tokens: torch.Tensor, class_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Returns the update [T, dim], the class token's (token 0) exact attention per head
        [heads, T] when asked (else None), and the values [heads, T, head_dim]."""
        length = tokens.shape[0]
        # [1, heads, T, head_dim] each: the fused attention kernels want a batch dimension
        q, k, v = (
            self.qkv(tokens).view(length, 3, self.heads, self.head_dim).permute(1, 2, 0, 3)
        ).unsqueeze(1)
        mixed = self.mix(q, k, v) + self.residual(v)
        update = self.out(mixed.squeeze(0).transpose(0, 1).reshape(length, -1))
        attention = None
        if class_attention:
            scores = q[0, :, :1] @ k[0].transpose(-1, -2) / math.sqrt(self.head_dim)
            attention = torch.softmax(scores, dim=-1).squeeze(1)  # [heads, T]
        return update, attention, v[0]

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Nyström approximation of softmax(q kᵀ/√d) v, [1, heads, T, head_dim]."""
        length = q.shape[-2]
        if length <= self.num_landmarks:
            return F.scaled_dot_product_attention(q, k, v)
        segment = math.ceil(length / self.num_landmarks)
        q_landmarks, k_landmarks = segment_means(q, segment), segment_means(k, segment)
        kernel = torch.softmax(
            q_landmarks @ k_landmarks.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1
        )  # [1, heads, m, m]
        landmark_context = F.scaled_dot_product_attention(q_landmarks, k, v)  # attn3 @ v
        # the iteration needs fp32 even under bf16 autocast ([m, m] only: cheap)
        with torch.autocast(device_type=q.device.type, enabled=False):
            inverse = iterative_pinv(kernel.float(), self.pinv_iterations)
        values = inverse.to(landmark_context.dtype) @ landmark_context
        return F.scaled_dot_product_attention(q, k_landmarks, values)  # attn1 @ (...)


class PPEG(nn.Module):
    """Pyramid position encoding: depthwise 7×7, 5×5 and 3×3 convolutions plus identity on
    the s × s grid of instance tokens; the class token passes unchanged.

    The three convolutions and the identity are one linear map, so they run as a single
    depthwise 7×7 convolution whose kernel is their sum (the 5×5 and 3×3 kernels centred).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.conv5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def fused_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        identity = torch.zeros_like(self.conv7.weight[:1])
        identity[..., 3, 3] = 1.0
        weight = (
            self.conv7.weight
            + F.pad(self.conv5.weight, (1, 1, 1, 1))
            + F.pad(self.conv3.weight, (2, 2, 2, 2))
            + identity
        )
        return weight, self.conv7.bias + self.conv5.bias + self.conv3.bias

    def forward(self, tokens: torch.Tensor, side: int) -> torch.Tensor:
        dim = tokens.shape[1]
        grid = tokens[1:].transpose(0, 1).reshape(1, dim, side, side)
        weight, bias = self.fused_kernel()
        mixed = F.conv2d(grid, weight, bias, padding=3, groups=dim)
        return torch.cat([tokens[:1], mixed.reshape(dim, side * side).transpose(0, 1)])


def pad_to_square(instances: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Append copies of the first s² − N rows of ``instances`` [N, d] (s = ⌈√N⌉), as the
    original; a square N is returned as it is. Returns the [s², d] rows and s."""
    count = instances.shape[0]
    side = math.isqrt(count)
    if side * side < count:
        side += 1
    extra = side * side - count
    if extra == 0:
        return instances, side
    return torch.cat([instances, instances[:extra]]), side


def fold_padding(token_weights: torch.Tensor, num_instances: int) -> torch.Tensor:
    """[N] weights of the instances from [s²] weights of the padded grid: each copy's
    weight is added to the instance it copies."""
    extra = token_weights.shape[0] - num_instances
    if extra == 0:
        return token_weights
    return torch.cat(
        [token_weights[:extra] + token_weights[num_instances:], token_weights[extra:num_instances]]
    )


class TransMIL(nn.Module):
    """TransMIL: bag [N, in_dim] → MILOutput (fine logits, class-token attention [1, N]).

    Args:
        in_dim: feature dimension D of the bags.
        num_fine: number of fine classes C_f.
        dim: token width (512). heads, head_dim, num_landmarks, pinv_iterations,
            residual_kernel: of both Nyström layers (8, 64, 256, 6, 33).
        dropout: after the embedding and each attention output; off by default.
        attention_layer: which layer's class-token attention is the output map (−1: last;
            MHIM's TransMIL teacher reads layer 0).
    """

    num_layers = 2

    def __init__(
        self,
        in_dim: int,
        num_fine: int,
        *,
        dim: int = 512,
        heads: int = 8,
        head_dim: int = 64,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.0,
        attention_layer: int = -1,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.attention_layer = attention_layer
        self.embedding = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.class_token = nn.Parameter(torch.randn(1, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(self.num_layers))
        self.layers = nn.ModuleList(
            NystromAttention(
                dim,
                heads=heads,
                head_dim=head_dim,
                num_landmarks=num_landmarks,
                pinv_iterations=pinv_iterations,
                residual_kernel=residual_kernel,
                dropout=dropout,
            )
            for _ in range(self.num_layers)
        )
        self.position = PPEG(dim)
        self.final_norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_fine)

    def encode(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class-token embedding [dim], and of layer ``attention_layer``: the class token's
        attention per head [heads, T] and the values [heads, T, head_dim] (T = 1 + s²)."""
        grid, side = pad_to_square(self.embedding(bag))
        tokens = torch.cat([self.class_token.to(grid.dtype), grid])
        attention_layer = self.attention_layer % self.num_layers
        for index, (norm, layer) in enumerate(zip(self.norms, self.layers, strict=True)):
            update, attention, values = layer(norm(tokens), index == attention_layer)
            if index == attention_layer:
                kept_attention, kept_values = attention, values
            tokens = tokens + update
            if index == 0:
                tokens = self.position(tokens, side)
        return self.final_norm(tokens[0]), kept_attention, kept_values

    def forward(self, bag: torch.Tensor) -> MILOutput:
        check_bag(bag, self.in_dim)
        embedding, attention, _ = self.encode(bag)
        instance_weights = fold_padding(attention.mean(dim=0)[1:], bag.shape[0])
        instance_weights = instance_weights / instance_weights.sum()
        return MILOutput(
            fine_logits=self.classifier(embedding),
            fine_attention=instance_weights.unsqueeze(0),
            embeddings=F.normalize(embedding, dim=-1).unsqueeze(0),
            bag_embedding=embedding,
        )

    @torch.no_grad()
    def class_aware_scores(self, bag: torch.Tensor) -> torch.Tensor:
        """[N] MHIM-v2 instance scores: each instance's attention-weighted values of layer
        ``attention_layer``, through that layer's output projection and the classifier;
        the max class probability."""
        _, attention, values = self.encode(bag)
        weighted = attention.unsqueeze(-1) * values  # [heads, T, head_dim]
        layer = self.layers[self.attention_layer % self.num_layers]
        features = layer.out(weighted.transpose(0, 1).flatten(1))  # [T, dim]
        scores = torch.softmax(self.classifier(features), dim=-1).amax(dim=-1)
        return scores[1 : 1 + bag.shape[0]]


@register_model
def transmil(in_dim: int, num_fine: int, num_coarse: int, **kwargs) -> TransMIL:
    """TransMIL on fine labels (coarse prediction derived from the fine one)."""
    del num_coarse
    return TransMIL(in_dim, num_fine, **kwargs)
