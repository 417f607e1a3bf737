"""The model and loss a fold trains: the model of ``--model`` with its dropout and MHIM
options, its loss preset, and for MHIM models the teacher it starts from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hmil.data.hierarchy import Hierarchy
from hmil.models import MILOutput, create_model, list_models
from hmil.models.mhim import MHIM, TeacherError, load_teacher
from hmil.training.config import TrainingError, TrainSettings
from hmil.training.losses import LOSS_PRESETS_PATH, HMILLoss, LossConfig
from plumbing.presets import read_presets


@dataclass(frozen=True)
class ModelAndLoss:
    """A built model (on its device), the loss settings it trains with and, for an MHIM
    model, the sha256 of its teacher's model.pt."""

    model: nn.Module
    loss_config: LossConfig
    loss_preset: str
    teacher_sha256: str | None = None

    @property
    def mhim_preset(self) -> str | None:
        return self.model.preset if isinstance(self.model, MHIM) else None


def check_model_name(name: str) -> None:
    if name not in list_models():
        raise TrainingError(f"unknown model {name!r} (available: {', '.join(list_models())})")


def build_model(
    settings: TrainSettings,
    hierarchy: Hierarchy,
    in_dim: int,
    device: torch.device,
    slide_norm: str = "none",
) -> ModelAndLoss:
    """The model and loss of ``settings`` with the slide norm chosen for this fold
    (:mod:`hmil.training.slide_centres`); TrainingError (one line) for options that do not
    fit the model, an unknown preset or an unusable teacher."""
    model_kwargs = mhim_model_kwargs(settings)
    if settings.dropout > 0:  # every model takes dropout; 0 keeps each model's own default
        model_kwargs["dropout"] = settings.dropout
    model_kwargs["slide_norm"] = slide_norm
    try:
        model = create_model(settings.model, in_dim=in_dim, hierarchy=hierarchy, **model_kwargs)
    except ValueError as error:  # e.g. an unknown MHIM preset
        raise TrainingError(str(error)) from None
    model = model.to(device)
    probe = probe_output(model, in_dim)
    own_preset = default_loss_preset(model, probe)
    loss_preset = settings.loss_preset or own_preset
    try:
        loss_config = model_loss(loss_preset, own_preset)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    check_loss_fits_model(probe, settings.model, loss_config, loss_preset, hierarchy)
    if not isinstance(model, MHIM):
        return ModelAndLoss(model, loss_config, loss_preset)
    # one source for the consistency weight: the MHIM preset's cl_alpha
    loss_config = dataclasses.replace(loss_config, consistency=model.config.cl_alpha)
    try:
        teacher_sha256 = load_teacher(
            model, settings.teacher, in_dim, list(hierarchy.fine), settings.fold
        )
    except TeacherError as error:
        raise TrainingError(f"--teacher {error}") from None
    return ModelAndLoss(model, loss_config, loss_preset, teacher_sha256)


def check_loss_fits_model(
    probe: MILOutput,
    name: str,
    loss_config: LossConfig,
    loss_preset: str,
    hierarchy: Hierarchy,
) -> None:
    """One error line, before any epoch, when a loss term needs an output the model does not
    give (e.g. the hmil preset's coarse terms on a flat model): the loss of the probe."""
    device = probe.fine_logits.device
    loss_fn = HMILLoss(hierarchy.membership_tensor(), num_epochs=1, config=loss_config)
    label = torch.zeros(1, dtype=torch.long, device=device)
    try:
        with torch.no_grad():
            loss_fn.to(device)([probe], label, epoch=0, coarse_labels=label)
    except ValueError as error:
        raise TrainingError(
            f"loss preset {loss_preset!r} does not fit model {name!r}: {error}"
        ) from None


def mhim_model_kwargs(settings: TrainSettings) -> dict[str, Any]:
    """Model kwargs from the MHIM options; they belong to mhim_* models only."""
    if not settings.model.startswith("mhim_"):
        for option in ("teacher", "mhim_preset"):
            if getattr(settings, option) is not None:
                flag = "--" + option.replace("_", "-")
                raise TrainingError(f"{flag} applies to mhim_* models only, not {settings.model!r}")
        return {}
    if settings.teacher is None:
        student = settings.model.removeprefix("mhim_")
        raise TrainingError(
            f"--model {settings.model} needs --teacher PATH: the {student!r} model.pt of the "
            f"same fold (e.g. models/<encoder>/{student}/fold{settings.fold}/model.pt)"
        )
    return {"mhim": settings.mhim_preset} if settings.mhim_preset is not None else {}


def default_loss_preset(model: nn.Module, probe: MILOutput) -> str:
    """The model's own preset (``loss_preset`` attribute: hmil_mb, clam, dsmil), else hmil
    for models with a coarse head, else flat."""
    own = getattr(model, "loss_preset", None)
    if own is not None:
        return own
    return "hmil" if probe.coarse_logits is not None else "flat"


def model_loss(preset: str, own_preset: str) -> LossConfig:
    """Loss preset ``preset`` on a model whose own preset is ``own_preset``: the fields the
    preset leaves out are the model's, so an ablation takes one term out of the model's own
    loss (``hmil_mb`` + ``no_bag_alignment`` keeps hmil_mb's departures)."""
    if preset == own_preset:
        return LossConfig.preset(preset)
    return LossConfig.preset(preset, base=read_presets(LOSS_PRESETS_PATH).get(own_preset))


def probe_output(model: nn.Module, in_dim: int) -> MILOutput:
    """The model's output for a 2-instance zero bag in eval mode: which heads it has, and
    what a loss can be computed from, before any epoch."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        parameter = next(model.parameters())
        output = model(torch.zeros(2, in_dim, device=parameter.device))
    model.train(was_training)
    return output
