"""Name → builder registry of MIL models, in the spirit of ``timm.create_model``.

A builder is a function ``(in_dim, num_fine, num_coarse, **kwargs) -> nn.Module`` whose
module maps one bag [N, in_dim] to a :class:`~hmil.models.output.MILOutput`. Register it
with ``@register_model`` (its function name becomes the model name) and it can be built
from a config string; nothing else needs editing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import overload

from torch import nn

from hmil.data.hierarchy import Hierarchy
from hmil.models.layers import SlideNorm

ModelBuilder = Callable[..., nn.Module]

_BUILDERS: dict[str, ModelBuilder] = {}


@overload
def register_model(name_or_builder: ModelBuilder) -> ModelBuilder: ...
@overload
def register_model(name_or_builder: str) -> Callable[[ModelBuilder], ModelBuilder]: ...
def register_model(name_or_builder):
    """Register a builder under its function name (``@register_model``) or a given name
    (``@register_model("clam_sb")``). Registering one name twice is an error."""

    def register(builder: ModelBuilder, name: str) -> ModelBuilder:
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is already registered")
        _BUILDERS[name] = builder
        return builder

    if isinstance(name_or_builder, str):
        return lambda builder: register(builder, name_or_builder)
    return register(name_or_builder, name_or_builder.__name__)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_BUILDERS)


def create_model(
    name: str,
    in_dim: int,
    hierarchy: Hierarchy | tuple[int, int],
    *,
    slide_norm: str = "none",
    **kwargs,
) -> nn.Module:
    """Build model ``name`` for bags of feature dimension ``in_dim``.

    Args:
        name: a registered model name (see :func:`list_models`).
        in_dim: feature dimension D, read from the data (never hard-coded).
        hierarchy: the label hierarchy, or the pair (num_fine, num_coarse).
        slide_norm: ``none``, ``center`` or ``standardize``: every bag is
            normalised (:class:`~hmil.models.layers.SlideNorm`, the child module
            ``slide_normaliser``) before the model sees it, the same for every model; the
            model's ``slide_norm`` attribute says which.
        **kwargs: hyperparameters passed on to the model's constructor.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r} (available: {', '.join(list_models())})")
    if isinstance(hierarchy, Hierarchy):
        num_fine, num_coarse = hierarchy.num_fine, hierarchy.num_coarse
    else:
        num_fine, num_coarse = hierarchy
    normaliser = SlideNorm(slide_norm)  # an unknown mode fails here, not later
    model = _BUILDERS[name](in_dim=in_dim, num_fine=num_fine, num_coarse=num_coarse, **kwargs)
    model.slide_norm = slide_norm
    if slide_norm != "none":
        # a child module called by a pre-hook, so that every model and every caller
        # (training, deployment, an MHIM teacher inside its student) gets the same
        # normalisation without a wrapper type
        model.slide_normaliser = normaliser
        model.register_forward_pre_hook(
            lambda module, args: (module.slide_normaliser(args[0]), *args[1:])
        )
    return model
