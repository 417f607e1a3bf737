"""Evaluate one encoder × model from its fold directories: the core of ``hmil.evaluate``.

When no fold can be evaluated, ``record_failure`` (what the workflow asks for outside
strict mode) writes a failed evaluation instead of stopping: the workflow expects every
file, and the comparison then names the run rather than losing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hmil.evaluation.outputs import write_failed_outputs, write_outputs
from hmil.evaluation.runs import NoFoldError, load_folds, run_identity
from hmil.evaluation.settings import BootstrapSettings
from hmil.evaluation.summary import Evaluation, evaluate

#: The figures the workflow expects of an evaluation, drawn as cards when it failed.
FAILED_FIGURES = ["training_curves.png"] + [
    f"{kind}_{level}.png" for level in ("fine", "coarse_from_fine") for kind in ("roc", "confusion")
]


@dataclass(frozen=True, kw_only=True)
class EvaluationConfig(BootstrapSettings):
    """The folds of one run, where its evaluation goes and its bootstrap
    (:class:`~hmil.evaluation.settings.BootstrapSettings`); built once from the command line."""

    run_dirs: tuple[Path, ...]
    out: Path
    strict: bool = False  #: a fold that cannot be evaluated is an error
    record_failure: bool = False  #: no fold at all: write a failed evaluation, do not fail
    name: str | None = None  #: ENCODER/MODEL; default from the paths

    def params(self) -> dict[str, Any]:
        return {"bootstrap": self.bootstrap, "seed": self.seed, "strict": self.strict}


@dataclass(frozen=True)
class EvaluatedRun:
    name: str  #: ENCODER/MODEL
    evaluation: Evaluation | None  #: None: recorded as a failed evaluation
    rows: list[dict[str, Any]]  #: summary rows (level, metric, mean, std, pooled, CI)
    failure: str = ""  #: why it was recorded as failed


def evaluate_run(config: EvaluationConfig) -> EvaluatedRun:
    """Read the folds, compute the metrics and write every file into ``config.out``."""
    identity = run_identity(list(config.run_dirs), config.name)
    try:
        folds, missing = load_folds(list(config.run_dirs), config.strict)
    except NoFoldError as error:
        if not config.record_failure or config.strict:
            raise
        name = "/".join(identity)
        write_failed_outputs(config.out, name, str(error), FAILED_FIGURES)
        return EvaluatedRun(name, None, [], str(error))
    evaluation = evaluate(folds, missing, identity, config.params())
    rows = write_outputs(evaluation, config.out)
    return EvaluatedRun(evaluation.name, evaluation, rows)
