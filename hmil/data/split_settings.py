"""The split settings, each declared once as a field of :class:`SplitSettings`: its type,
default, bounds and one-line help. From it come ``python -m hmil.splits``'s options
(:func:`plumbing.cli.add_options`) and the words the workflow's splits rule passes from its
config's ``splits`` section (:func:`plumbing.settings.option_words`); a test holds that
section of the schema equal to it. Where the files go and which sheet is split are not
settings (:class:`~hmil.data.split_files.SplitConfig`).

Standard library only: the workflow imports it when it plans the jobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from plumbing.settings import Bounded, option

#: The split protocols: patient-grouped stratified k-fold, or the paper's random draws.
PROTOCOLS = ("kfold", "repeated")
#: A share of the patients: more than none, less than all.
SHARE = Bounded(float, above=0, below=1)


@dataclass(frozen=True, kw_only=True)
class SplitSettings:
    """How the patients are dealt into folds. The bounds here are those of any sheet; the
    ones that depend on each other (k-fold needs two folds; the repeated protocol's shares
    must leave a training part) are checked with the sheet
    (:func:`hmil.data.splits.check_parameters`)."""

    folds: int | None = field(
        default=None,
        metadata=option(
            "folds (kfold) or repeats; with --from-hmil-pkls, the published splits expected",
            parse=Bounded(int, minimum=1),
        ),
    )
    seed: int = field(
        default=0,
        metadata=option(
            "seed of the split (the split depends on nothing else)", parse=Bounded(int, minimum=0)
        ),
    )
    val_fraction: float = field(
        default=0.1,
        metadata=option(
            "kfold: of each fold's non-test patients; repeated: of all patients", parse=SHARE
        ),
    )
    protocol: str = field(
        default="kfold",
        metadata=option(
            "kfold: patient-grouped stratified k-fold; repeated: the paper's random 80/10/10",
            choices=PROTOCOLS,
        ),
    )
    # not in the workflow config, whose repeated protocol keeps the paper's 10 % test share
    test_fraction: float = field(
        default=0.1, metadata=option("repeated: test share of the patients", parse=SHARE)
    )
    allow_sparse_classes: bool = field(
        default=False,
        metadata=option(
            "warn instead of failing when a class is too small for every part of every fold"
        ),
    )
