"""Reading encoder checkpoints: state dicts unwrapped, checked against the model, loaded.

Used by the built-in encoders and by the zoo's `transformers` entries alike; a checkpoint
that does not fit an encoder fails with one line saying how it differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from preprocessing.features.encoder_registry import EncoderError, EncoderSpec

#: Keys a checkpoint may nest its state dict under (Lightning, DINO, our own trainers).
_NESTING_KEYS = ("state_dict", "model", "teacher", "student")
#: Prefixes left by DataParallel / DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapped from nesting keys and wrapper prefixes."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and safetensors errors have no common base
        reason = first_sentence(err) or type(err).__name__
        raise EncoderError(f"{path}: not a readable checkpoint ({reason})") from None
    while isinstance(state, Mapping):
        nested = next((k for k in _NESTING_KEYS if isinstance(state.get(k), Mapping)), None)
        if nested is None:
            break
        state = state[nested]
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, Mapping):
        raise EncoderError(f"{path}: checkpoint holds a {type(state).__name__}, not a state dict")
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        tensors[key] = value
    if not tensors:
        raise EncoderError(f"{path}: checkpoint holds no tensors")
    return tensors


def first_sentence(err: Exception, limit: int = 160) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text.split(". ")[0][:limit]


def load_checkpoint(model: nn.Module, path: Path, spec: EncoderSpec, assign: bool = False) -> None:
    """Load `path` into `model` strictly; a mismatch is one line saying how it differs.

    With `assign` the model's (meta) tensors are replaced by the checkpoint's, cast to the
    model's dtypes.
    """
    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith(spec.ignored_prefixes)}
    # A pooling wrapper holds the published model under a prefix; compare in published names.
    prefix = model.inner_prefix if isinstance(model, PublishedLayout) else ""
    expected = {k.removeprefix(prefix): v for k, v in model.state_dict().items()}
    check_fits(expected, state, spec, path)
    state = {f"{prefix}{k}": v.to(expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=assign)


def check_fits(
    expected: Mapping[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    spec: EncoderSpec,
    path: Path,
) -> None:
    """Raise one line saying how the checkpoint's tensors `state` differ from `expected`."""
    # Old BatchNorm checkpoints lack this counter; it plays no part in inference.
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {label} keys e.g. {keys[0]!r}")
        if mismatched:
            key = mismatched[0]
            parts.append(
                f"{len(mismatched)} shape mismatches e.g. {key!r} "
                f"{tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
            )
        raise EncoderError(
            f"{path}: checkpoint does not fit encoder {spec.name} ({', '.join(parts)})"
        )


class PublishedLayout(nn.Module):
    """A wrapper that adds pooling around a published model kept under `inner_prefix`.

    Checkpoints hold the published model's key names; `load_checkpoint` puts them under the
    prefix, so a wrapper never needs its own checkpoint format.
    """

    inner_prefix = "model."
