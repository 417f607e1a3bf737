"""Patch encoders by name: a registry of timm architectures with their input contract and weights.

Each entry declares what a caller needs before building anything: the input size and µm/px
the encoder expects, its normalisation, its output dimension and where its weights come from.
Adding an encoder is one `register(EncoderSpec(...))`. Names of the form `timm:<model>` give
any timm model's pooled features, with its own normalisation and `num_features`.

Weights (`build_encoder(name, weights)`): a checkpoint file (`.pth`/`.pt`/`.bin`/
`.safetensors`), `"random"` (tests and demos only), or None for the entry's default download.
Every output records where its weights came from (`weights_record`). Random weights are drawn
from a fixed seed (`RANDOM_WEIGHTS_SEED`), so two runs give identical features.

The pathology foundation models (UNI2-h, Virchow2, H-optimus, Prov-GigaPath, Phikon-v2, ...)
are registered in `preprocessing.features.encoder_zoo`, each with the source of its numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import timm
import torch
from torch import nn

from plumbing.digests import file_sha256
from plumbing.errors import PipelineError
from preprocessing.features.handcrafted import FEATURE_DIM as STAIN_TEXTURE_DIM
from preprocessing.features.handcrafted import StainTextureEncoder

log = logging.getLogger("hmil.encoders")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_WEIGHTS = "random"
#: Seed of `--weights random`: recorded in every features file (`weights_seed`).
RANDOM_WEIGHTS_SEED = 0
TIMM_PREFIX = "timm:"
#: Keys a checkpoint may nest its state dict under (Lightning, DINO, our own trainers).
_NESTING_KEYS = ("state_dict", "model", "teacher", "student")
#: Prefixes left by DataParallel / DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class EncoderError(PipelineError):
    """An encoder cannot be named, built or given its weights."""


@dataclass(frozen=True)
class EncoderSpec:
    """What a patch encoder expects and gives; the input contract of `preprocessing.extract`."""

    name: str
    architecture: str  #: timm model name (or the class name `create` builds)
    #: Architecture arguments: timm `create_model` kwargs, or the config of `create`.
    timm_kwargs: Mapping = field(default_factory=dict, hash=False)
    input_size: int = 224  #: square input, px
    mpp: float = 0.5  #: µm/px the encoder was trained at
    mean: tuple[float, float, float] = IMAGENET_MEAN  #: on [0, 1] RGB
    std: tuple[float, float, float] = IMAGENET_STD
    feature_dim: int = 0  #: length of one patch's feature vector
    pretrained: str | None = None  #: default weights: timm tag or `hf-hub:<repo>`
    #: Checkpoint keys that the encoder drops on purpose (classifier, truncated stages).
    ignored_prefixes: tuple[str, ...] = ()
    #: Turns the timm model into the encoder (truncation, pooling); identity when None.
    adapt: Callable[[nn.Module], nn.Module] | None = field(default=None, compare=False)
    #: Builds a weight-free encoder (no timm model, no checkpoint); None for timm encoders.
    builder: Callable[[], nn.Module] | None = field(default=None, compare=False)
    #: Builds a non-timm encoder with its weights, `create(spec, weights)` with weights None
    #: (download), `"random"` or a checkpoint Path (e.g. a `transformers` model); None for timm.
    create: Callable[[EncoderSpec, str | Path | None], nn.Module] | None = field(
        default=None, compare=False
    )


_REGISTRY: dict[str, EncoderSpec] = {}
NO_WEIGHTS = "none"  #: weights record of a weight-free encoder


def register(spec: EncoderSpec) -> EncoderSpec:
    if spec.name in _REGISTRY or spec.name.startswith(TIMM_PREFIX):
        raise ValueError(f"encoder name {spec.name!r} is taken")
    _REGISTRY[spec.name] = spec
    return spec


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


def list_encoders() -> list[str]:
    """Registered names; any `timm:<model>` is accepted as well."""
    return sorted(_REGISTRY)


def get_encoder_spec(name: str) -> EncoderSpec:
    """The spec of `name` with `feature_dim` known (timm models are sized on the meta device)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith(TIMM_PREFIX):
        return _timm_spec(name)
    known = ", ".join(list_encoders())
    raise EncoderError(f"unknown encoder {name!r}; known: {known}, or timm:<any timm model>")


def _timm_spec(name: str) -> EncoderSpec:
    architecture = name[len(TIMM_PREFIX) :]
    if not timm.is_model(architecture):
        raise EncoderError(f"unknown encoder {name!r}: {architecture!r} is not a timm model")
    # The meta device builds the module tree without allocating or initialising weights.
    with torch.device("meta"):
        model = timm.create_model(architecture, pretrained=False, num_classes=0)
    cfg = model.pretrained_cfg
    size = cfg.get("test_input_size") or cfg.get("input_size") or (3, 224, 224)
    classifier = cfg.get("classifier")
    classifiers = classifier if isinstance(classifier, (list, tuple)) else (classifier,)
    return EncoderSpec(
        name=name,
        architecture=architecture,
        timm_kwargs={"num_classes": 0},
        input_size=int(size[-1]),
        mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),
        feature_dim=int(model.num_features),
        pretrained=architecture,
        ignored_prefixes=tuple(f"{c}." for c in classifiers if c),
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
        reason = _first_sentence(err)
        raise EncoderError(
            f"encoder {spec.name}: cannot get its default weights {source} "
            f"({type(err).__name__}{': ' + reason if reason else ''}); give a local "
            "checkpoint with --weights PATH, or --weights random for a test run"
        ) from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapped from nesting keys and wrapper prefixes."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and safetensors errors have no common base
        reason = _first_sentence(err) or type(err).__name__
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


def _first_sentence(err: Exception, limit: int = 160) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text.split(". ")[0][:limit]


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


# The foundation-model entries register themselves; imported last, as they use the names above.
from preprocessing.features import encoder_zoo  # noqa: E402, F401
