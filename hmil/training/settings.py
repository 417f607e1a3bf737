"""The training settings, each declared once: its type, its value under each ``--protocol``,
its bounds or choices and its one-line help.

:class:`TrainingSettings` is the model. From it come ``python -m hmil.train``'s options
(:func:`add_setting_options`), the flags the workflow and the learning check pass
(:func:`setting_flags`), the workflow config schema's ``training`` entries
(:func:`schema_properties`; a test holds the schema equal to them), the checks of a value
(one line naming the option) and what a run records (:func:`recorded`). Adding a setting is
one field here plus its use.

Standard library only: the workflow imports this module when it plans the jobs, and must
not pay for torch there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from plumbing.errors import PipelineError

#: The protocols, in the order ``--protocol`` lists them; the first is the default.
PROTOCOL_NAMES = ("default", "paper")
#: The keys of the first releases' records (metrics.json, model.pt, last.pt), in their
#: order; every later key follows in the order of :class:`TrainingSettings`. Kept so that
#: records stay byte for byte what they were.
EARLIEST_RECORD = (
    "model", "fold", "epochs", "seed", "batch_bags", "lr", "optimizer", "scheduler",
    "patience", "loss_preset", "hierarchy",
)  # fmt: skip


class TrainingError(PipelineError):
    """Bad training input (settings, splits table, fold, model name, features); one line."""


def parse_bool(value: bool | str) -> bool:
    """true/false (yes/no, 1/0) as the command line and YAML give them."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0"):
        return False
    raise ValueError(f"expected true or false, not {value!r}")


def setting(
    help: str,
    *,
    default: Any,
    paper: Any = None,
    minimum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    choices: tuple[str, ...] = (),
    auto: bool = False,
    new: bool = False,
    before: Any = None,
) -> Any:
    """A field of :class:`TrainingSettings`. ``default`` is its value under the default
    protocol, ``paper`` under the paper's (None: the same); ``minimum`` is inclusive,
    ``above`` and ``below`` exclusive bounds; ``auto``: the word ``auto`` is a value too.
    ``new``: newer than runs already recorded, so recorded only when not at ``default``
    (their records still match and they resume or are skipped); every setting added from
    now on is new; ``before``: what runs recorded before the setting existed did, when
    that is not ``default`` (a new default changes the weights, so those runs retrain)."""
    by_protocol = {"default": default, "paper": default if paper is None else paper}
    return field(
        default=None,
        metadata={
            "help": help, "by_protocol": by_protocol, "minimum": minimum, "above": above,
            "below": below, "choices": choices, "auto": auto, "new": new,
            "before": default if before is None else before,
        }
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class TrainingSettings:
    """The settings a ``--protocol`` gives a run of one fold; a value given (on the command
    line, in the workflow config) wins, and None takes the protocol's. ``min_epochs`` is a
    count or ``auto``: early stopping waits for half the run, and for a loss with schedules
    (HMIL's α(e), τ(e)) until the fine terms outweigh the coarse CE, α(e) < 1/2, e ≥ E/√2;
    a number given as text (the command line's) is read as that number."""

    protocol: str = "default"
    epochs: int = setting(
        "E, also the length of HMIL's schedules", default=50, paper=200, minimum=1
    )
    batch_bags: int = setting(
        "bags per optimiser step (a number of bags, not scaled)", default=8, paper=64, minimum=1
    )
    lr: float = setting("peak learning rate", default=1e-3, paper=1e-4, above=0)
    optimizer: str = setting(
        "default: the protocol's", default="adamw", paper="adam", choices=("adam", "adamw")
    )
    weight_decay: float = setting("adamw: decoupled; adam: L2", default=1e-4, paper=0.0, minimum=0)
    scheduler: str = setting(
        "warmup_cosine: per optimiser step, linear warm-up then cosine to the floor; "
        "cosine: per epoch to the floor; plateau: ÷10 after 5 epochs without a lower val "
        "fine CE, not below the floor",
        default="warmup_cosine", paper="plateau", choices=("warmup_cosine", "cosine", "plateau"),
    )  # fmt: skip
    warmup_epochs: float = setting(
        "warmup_cosine: warm-up length", default=1.0, paper=0.0, minimum=0
    )
    lr_floor: float = setting(
        "the lr never falls below this fraction of --lr", default=0.05, paper=0.0, minimum=0,
        below=1,
    )  # fmt: skip
    patience: int = setting(
        "early stopping: epochs without a better --selection score",
        default=15, paper=20, minimum=1,
    )  # fmt: skip
    min_epochs: int | str = setting(
        "early stopping cannot end the run before this many epochs; auto: E/2, and "
        "E/√2 for losses with schedules (HMIL's curriculum)",
        default="auto", paper=0, minimum=0, auto=True,
    )  # fmt: skip
    dropout: float = setting(
        "models' dropout (0: off)", default=0.25, paper=0.0, minimum=0, below=1
    )
    instance_dropout: float = setting(
        "fraction of each training bag's instances dropped at random, every step",
        default=0.25, paper=0.0, minimum=0, below=1,
    )  # fmt: skip
    balanced_sampling: bool = setting(
        "draw training bags with replacement, every fine class equally often (CLAM's "
        "--weighted_sample); an epoch still has as many bags as the training set",
        default=False, new=True,
    )  # fmt: skip
    class_weights: str = setting(
        "balanced: each training bag's classification losses (fine and coarse CE, and "
        "the validation CE that selects the epoch) weighed by n / (C n_c) of its fine "
        "class in the fold's training slides, as scikit-learn's class_weight='balanced'; "
        "the weights average 1 over the training slides; none: every bag alike",
        default="none", choices=("none", "balanced"), new=True,
    )  # fmt: skip
    slide_norm: str = setting(
        "per-slide normalisation of the features inside the model (a slide-level "
        "offset from stain, scanner or site): center subtracts each feature's median over "
        "the slide's instances, standardize also divides by its SD; auto centres where the "
        "training slides' means show no class effect between patients (a permutation "
        "test, p >= 0.05); "
        "the norm used is recorded in model.pt",
        default="auto", paper="none", choices=("none", "center", "standardize", "auto"),
        new=True, before="none",
    )  # fmt: skip
    selection: str = setting(
        "which epoch's model is kept and what early stopping waits for: auc, the best "
        "validation fine macro-AUC; loss, the lowest validation fine cross-entropy",
        default="loss", paper="auc", choices=("auc", "loss"), new=True, before="auc",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOL_NAMES:
            raise TrainingError(
                f"unknown protocol {self.protocol!r} (one of: {', '.join(PROTOCOL_NAMES)})"
            )
        for spec in setting_fields():
            value = getattr(self, spec.name)
            if value is None:
                value = spec.metadata["by_protocol"][self.protocol]
            object.__setattr__(self, spec.name, checked(spec, value))


def setting_fields() -> tuple[dataclasses.Field, ...]:
    """The fields a protocol gives, in their order."""
    return tuple(f for f in dataclasses.fields(TrainingSettings) if "by_protocol" in f.metadata)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def checked(spec: dataclasses.Field, value: Any) -> Any:
    """``value`` of the setting ``spec`` in its type, or a TrainingError naming the option."""
    meta, option = spec.metadata, flag(spec.name)
    if meta["auto"] and value == "auto":
        return value
    if spec.type == "bool":
        try:
            return parse_bool(value)
        except ValueError as error:
            raise TrainingError(f"{option}: {error}") from None
    if meta["choices"]:
        if value not in meta["choices"]:
            raise TrainingError(f"{option} must be one of: {', '.join(meta['choices'])}")
        return value
    if meta["auto"]:
        try:
            value = int(value)
        except ValueError:
            raise TrainingError(f"{option}: expected a number or auto, not {value!r}") from None
    low, above, below = meta["minimum"], meta["above"], meta["below"]
    if low is not None and below is not None and not low <= value < below:
        raise TrainingError(f"{option} must be in [{low}, {below})")
    if low is not None and below is None and value < low:
        raise TrainingError(f"{option} must be ≥ {low}")
    if above is not None and value <= above:
        raise TrainingError(f"{option} must be > {above}")
    return value


def protocols() -> dict[str, dict[str, Any]]:
    """{protocol: {setting: value}}, each protocol's value of every setting."""
    specs = setting_fields()
    return {p: {s.name: s.metadata["by_protocol"][p] for s in specs} for p in PROTOCOL_NAMES}


#: Settings of each ``--protocol`` (see :class:`TrainingSettings`).
PROTOCOLS = protocols()
#: Settings recorded only when they differ from these: ``new`` settings, at what runs
#: recorded before they existed did.
EARLIER_VALUES = {s.name: s.metadata["before"] for s in setting_fields() if s.metadata["new"]}
SETTING_NAMES = tuple(s.name for s in setting_fields())


def recorded(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` as a run records them: the earliest records' keys first, then the
    protocol and the settings in their order, then the rest; a new setting at what earlier
    runs did left out."""
    order = [*EARLIEST_RECORD, "protocol", *SETTING_NAMES]
    keys = [k for k in order if k in values] + [k for k in values if k not in order]
    return {
        key: values[key]
        for key in keys
        if not (key in EARLIER_VALUES and values[key] == EARLIER_VALUES[key])
    }


def add_setting_options(parser) -> None:
    """``--protocol`` and an option per setting (unset: None, the protocol's value)."""
    parser.add_argument(
        "--protocol",
        choices=PROTOCOL_NAMES,
        default="default",
        help="the settings of the options below that are not given (default: default)",
    )
    for spec in setting_fields():
        meta = spec.metadata
        kwargs: dict[str, Any] = {"help": meta["help"]}
        if spec.type == "bool":
            kwargs["metavar"] = "{true,false}"
        elif meta["choices"]:
            kwargs["choices"] = meta["choices"]
        elif not meta["auto"]:
            kwargs["type"] = {"int": int, "float": float}[spec.type]
        parser.add_argument(flag(spec.name), **kwargs)


def setting_flags(values: Mapping[str, Any]) -> list[str]:
    """Command-line words of the protocol and settings in ``values`` (a workflow config's
    ``training`` section): ``--protocol P`` when given, then ``--name value`` for each
    setting given, in their order; the others take the protocol's value."""
    words = ["--protocol", str(values["protocol"])] if values.get("protocol") else []
    for name in SETTING_NAMES:
        if values.get(name) is not None:
            words += [flag(name), str(values[name])]
    return words


def schema_properties() -> dict[str, Any]:
    """The JSON-schema properties of the protocol and every setting (the workflow's
    ``training`` section holds them, with no default: the protocol gives it)."""
    properties: dict[str, Any] = {
        "protocol": {"type": "string", "enum": list(PROTOCOL_NAMES), "default": "default"}
    }
    for spec in setting_fields():
        properties[spec.name] = schema_of(spec)
    return properties


def schema_of(spec: dataclasses.Field) -> dict[str, Any]:
    meta = spec.metadata
    if spec.type == "bool":
        return {"type": "boolean"}
    if meta["choices"]:
        return {"type": "string", "enum": list(meta["choices"])}
    kind = "integer" if spec.type in ("int", "int | str") else "number"
    entry: dict[str, Any] = {"type": kind}
    for key, bound in (
        ("minimum", meta["minimum"]), ("exclusiveMinimum", meta["above"]),
        ("exclusiveMaximum", meta["below"]),
    ):  # fmt: skip
        if bound is not None:
            entry[key] = bound
    if meta["auto"]:
        return {"oneOf": [entry, {"type": "string", "enum": ["auto"]}]}
    return entry
