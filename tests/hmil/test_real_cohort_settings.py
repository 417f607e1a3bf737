"""What issue 28 added for cohorts like real ones: ``hmil_mb`` (HMIL with a scorer per class
row), per-slide feature normalisation inside every model (``slide_norm``), class-balanced
sampling of training bags, and the generator's class proportions and slide-level shifts."""

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from hmil.data.hierarchy import load_hierarchy
from hmil.data.synthetic import SyntheticConfig, generate_cohort
from hmil.evaluation.fold_models import load_fold_model
from hmil.models import create_model, list_models
from hmil.models.hmil import HMIL, HMILMB
from hmil.train import main
from hmil.training.loop import class_balanced_weights, epoch_loader
from hmil.training.losses import LossConfig
from hmil.training.model_setup import model_loss
from hmil.training.settings import TrainingError
from tests.hmil.train_cli import one_error_line, write_fold_cohort

SMALL = SyntheticConfig(
    bags_per_class=4, feature_dim=16, min_instances=20, max_instances=40, signal=6.0, seed=5
)
#: Every registered model, with the kwargs it needs to be built alone.
MODELS = [name for name in list_models() if not name.startswith("mhim_")] + ["mhim_abmil"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """16 slides of 4 fine classes; fold0: 1 slide per class in test, 1 in val, 2 in train."""
    return write_fold_cohort(tmp_path_factory.mktemp("real_cohort"), SMALL, 1, 1)


def train_args(cohort, out, *extra, model="hmil_mb", epochs=2):
    return [
        "--features", str(cohort["root"] / "features"),
        "--splits", str(cohort["splits"]),
        "--fold", "0", "--model", model, "--hierarchy", str(cohort["hierarchy"]),
        "--out", str(out), "--epochs", str(epochs), "--batch-bags", "4", "--seed", "1",
        *extra,
    ]  # fmt: skip


def test_hmil_mb_with_every_row_scored_alike_is_hmil(tiny_hierarchy):
    # The one difference is the readout: give each class row HMIL's shared scorer (and a
    # zero bias) and hmil_mb is HMIL, output for output.
    torch.manual_seed(0)
    hmil = create_model("hmil", 24, tiny_hierarchy).eval()
    hmil_mb = create_model("hmil_mb", 24, tiny_hierarchy).eval()
    assert isinstance(hmil_mb, HMILMB) and type(hmil) is HMIL
    state = {k: v for k, v in hmil.state_dict().items() if "scorer" not in k}
    missing = hmil_mb.load_state_dict(state, strict=False).missing_keys
    assert sorted(missing) == [
        "coarse_scorer.bias", "coarse_scorer.weight", "fine_scorer.bias", "fine_scorer.weight",
    ]  # fmt: skip
    with torch.no_grad():
        for branch, rows in (("fine", 4), ("coarse", 2)):
            shared = getattr(hmil, f"{branch}_scorer").weight  # [1, width]
            getattr(hmil_mb, f"{branch}_scorer").weight.copy_(shared.expand(rows, -1))
            getattr(hmil_mb, f"{branch}_scorer").bias.zero_()
        bag = torch.randn(30, 24)
        expected, got = hmil(bag), hmil_mb(bag)
    for field in ("fine_logits", "coarse_logits", "fine_attention", "embeddings"):
        torch.testing.assert_close(getattr(got, field), getattr(expected, field))


def test_hmil_mb_scores_each_row_with_its_own_weights_and_bias(tiny_hierarchy):
    torch.manual_seed(0)
    model = create_model("hmil_mb", 24, tiny_hierarchy)
    assert model.fine_scorer.weight.shape == (4, 256)
    assert model.coarse_scorer.weight.shape == (2, 24)
    output = model(torch.randn(30, 24))
    output.fine_logits[2].backward()
    # a row's logit depends on its own scorer row and bias only
    assert model.fine_scorer.bias.grad.tolist() == [0.0, 0.0, 1.0, 0.0]
    assert model.fine_scorer.weight.grad[[0, 1, 3]].abs().sum() == 0
    assert model.fine_scorer.weight.grad[2].abs().sum() > 0


def test_hmil_mb_reads_each_slot_less_the_mean_slot_from_half_way_through_training(
    tiny_hierarchy,
):
    torch.manual_seed(0)
    model = create_model("hmil_mb", 24, tiny_hierarchy)
    slots, offset = torch.randn(4, 256), 3 * torch.randn(1, 256)  # one shift for every slot
    with torch.no_grad():
        moved = model.fine_scorer(slots + offset) - model.fine_scorer(slots)
    assert moved.abs().max() > 1e-3  # at the start the rows read the slots as they are
    for fraction, centring in ((0.0, 0.0), (0.25, 0.5), (0.5, 1.0), (0.9, 1.0)):
        model.set_training_progress(fraction)
        assert float(model.fine_scorer.centring) == float(model.coarse_scorer.centring)
        assert float(model.fine_scorer.centring) == centring
    with torch.no_grad():  # then the shift cancels in every row
        torch.testing.assert_close(model.fine_scorer(slots + offset), model.fine_scorer(slots))
    # a model saved before the centring existed loads with c = 0: it reads as it did
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("centring")}
    older = create_model("hmil_mb", 24, tiny_hierarchy)
    older.set_training_progress(1.0)
    older.load_state_dict(state)  # strict: nothing missing
    assert float(older.fine_scorer.centring) == float(older.coarse_scorer.centring) == 0.0


def test_the_trainer_moves_hmil_mb_to_centred_readouts_and_deployment_keeps_them(cohort, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(cohort, out, epochs=4)) == 0
    best = json.loads((out / "metrics.json").read_text())["best_epoch"]
    loaded = load_fold_model(out, torch.device("cpu")).module
    # set before each of the epoch's 2 steps (8 training bags, 4 a step) with the share of
    # training done: the best epoch's last step saw (best + 1/2) / 4, the ramp ends at 1/2
    centring = min(1.0, (best + 0.5) / 4 / 0.5)
    assert float(loaded.fine_scorer.centring) == centring
    assert float(loaded.coarse_scorer.centring) == centring


@pytest.mark.parametrize("name", MODELS)
def test_slide_norm_center_makes_every_model_blind_to_a_slide_offset(tiny_hierarchy, name):
    torch.manual_seed(0)
    model = create_model(name, 24, tiny_hierarchy, slide_norm="center").eval()
    plain = create_model(name, 24, tiny_hierarchy).eval()
    assert model.slide_norm == "center" and plain.slide_norm == "none"
    bag, offset = torch.randn(40, 24), 5 * torch.randn(1, 24)
    with torch.no_grad():
        torch.testing.assert_close(
            model(bag + offset).fine_logits, model(bag).fine_logits, atol=1e-4, rtol=1e-4
        )
        moved = plain(bag + offset).fine_logits - plain(bag).fine_logits
    assert moved.abs().max() > 1e-3  # without it the offset reaches the logits


def test_slide_norm_standardize_also_removes_a_per_slide_scale(tiny_hierarchy):
    torch.manual_seed(0)
    model = create_model("abmil", 24, tiny_hierarchy, slide_norm="standardize").eval()
    bag = torch.randn(40, 24)
    with torch.no_grad():
        torch.testing.assert_close(
            model(3 * bag + 2).fine_logits, model(bag).fine_logits, atol=1e-4, rtol=1e-4
        )


def test_unknown_slide_norm_is_refused(tiny_hierarchy):
    with pytest.raises(ValueError, match=r"unknown slide_norm 'mean' \(one of: none, center"):
        create_model("abmil", 24, tiny_hierarchy, slide_norm="mean")


def test_slide_norm_is_recorded_and_deployment_rebuilds_it(cohort, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(cohort, out, "--slide-norm", "center", model="abmil")) == 0
    checkpoint = torch.load(out / "model.pt", weights_only=False)
    assert checkpoint["model_kwargs"] == {"slide_norm": "center"}
    assert checkpoint["config"]["slide_norm"] == "center"
    loaded = load_fold_model(out, torch.device("cpu"))
    assert loaded.module.slide_norm == "center"
    bag = torch.randn(25, SMALL.feature_dim)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.module(bag + 7).fine_logits, loaded.module(bag).fine_logits,
            atol=1e-4, rtol=1e-4,
        )  # fmt: skip


def test_runs_at_the_default_settings_keep_their_earlier_record(cohort, tmp_path):
    # Settings added later appear in metrics.json only when they differ from what runs
    # made before they existed did, so such a run still matches (is neither retrained nor
    # refused); selection by loss and slide_norm auto are such differences: those runs kept
    # the best-AUC epoch and never centred a slide.
    out = tmp_path / "run"
    args = train_args(cohort, out, "--selection", "auc", "--slide-norm", "none", model="abmil")
    assert main(args) == 0
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert "slide_norm" not in config and "balanced_sampling" not in config
    assert "selection" not in config
    assert "slide_norm" not in torch.load(out / "model.pt", weights_only=False)["model_kwargs"]


def test_a_run_recorded_before_selection_by_loss_is_not_taken_for_a_default_run(cohort, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(cohort, out, "--selection", "auc", model="abmil")) == 0
    with pytest.raises(TrainingError, match="holds outputs of a run with other settings"):
        main(train_args(cohort, out, model="abmil"))  # a hand-made run: refused
    assert main(train_args(cohort, out, "--restart-if-changed", model="abmil")) == 0
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["selection"] == "loss"


@pytest.mark.parametrize(
    "preset", ["flat", "no_instance_alignment", "no_bag_alignment", "no_contrastive"]
)
def test_every_hmil_ablation_applies_to_hmil_mb(cohort, tmp_path, preset):
    out = tmp_path / preset
    assert main(train_args(cohort, out, "--loss-preset", preset)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["model"] == "hmil_mb"
    assert metrics["config"]["loss_preset"] == preset
    log = pd.read_csv(out / "log.csv")
    if preset == "flat":
        assert "train_coarse_ce" not in log or (log["train_coarse_ce"] == 0).all()


def test_class_balanced_weights_give_every_class_the_same_mass():
    labels = np.array([0, 0, 0, 0, 1, 2, 2])
    weights = class_balanced_weights(labels)
    per_class = [float(weights[labels == k].sum()) for k in range(3)]
    assert per_class == pytest.approx([1.0, 1.0, 1.0])


def test_balanced_sampling_draws_rare_classes_as_often_as_common_ones():
    class Bags(torch.utils.data.Dataset):
        fine_labels = np.array([0] * 90 + [1] * 10)

        def __len__(self):
            return 100

        def __getitem__(self, index):
            return int(self.fine_labels[index])  # the bag's class stands in for the bag

    loader = epoch_loader(Bags(), 100, 0, 0, 0, balanced=True)
    loader.collate_fn = list
    first_epoch = next(iter(loader))
    drawn = Counter(first_epoch)
    assert sum(drawn.values()) == 100
    assert 35 <= drawn[1] <= 65  # expected 50 (uniform shuffling gives 10)
    again = epoch_loader(Bags(), 100, 0, 0, 0, balanced=True)
    again.collate_fn = list
    assert next(iter(again)) == first_epoch  # seeded by (seed, epoch): resumable


def test_balanced_sampling_trains_and_is_recorded(cohort, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(cohort, out, "--balanced-sampling", "true")) == 0
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["balanced_sampling"] is True


def test_balanced_sampling_without_a_class_in_training_names_the_fold(cohort, tmp_path, capsys):
    table = pd.read_csv(cohort["splits"])
    table.loc[(table["label"] == "b2") & (table["fold0"] == "train"), "fold0"] = "val"
    splits = tmp_path / "DATA_SPLIT.csv"
    table.to_csv(splits, index=False)
    args = train_args(cohort, tmp_path / "run", "--balanced-sampling", "true")
    args[args.index("--splits") + 1] = str(splits)
    line = one_error_line(capsys, args)
    assert "fold 0" in line and "'b2'" in line and "class-balanced sampling" in line
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_bad_boolean_for_balanced_sampling_is_a_usage_error(cohort, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(train_args(cohort, tmp_path / "run", "--balanced-sampling", "maybe"))
    assert "--balanced-sampling: expected true or false, not 'maybe'" in capsys.readouterr().err


def test_a_coarse_loss_on_a_model_without_a_coarse_head_is_one_line(cohort, tmp_path, capsys):
    args = train_args(cohort, tmp_path / "run", "--loss-preset", "hmil", model="abmil")
    line = one_error_line(capsys, args)
    assert "loss preset 'hmil' does not fit model 'abmil'" in line and "coarse_ce" in line
    assert not (tmp_path / "run" / "model.pt").exists()


def test_generated_cohorts_take_real_class_proportions():
    panda = load_hierarchy("panda")
    counts = (27, 26, 13, 12, 12, 11)
    cohort = generate_cohort(panda, SyntheticConfig(bags_per_class=counts, feature_dim=8))
    assert cohort.table["label"].value_counts().reindex(panda.fine).tolist() == list(counts)
    with pytest.raises(ValueError, match="bags_per_class has 2 counts for 6 fine classes"):
        generate_cohort(panda, SyntheticConfig(bags_per_class=(3, 4), feature_dim=8))


def test_a_slide_shift_moves_every_instance_of_a_slide_by_one_offset():
    bracs = load_hierarchy("bracs")
    config = SyntheticConfig(bags_per_class=3, feature_dim=32, signal=4.0, seed=2)
    plain = generate_cohort(bracs, config)
    shifted = generate_cohort(bracs, SyntheticConfig(**{**config.__dict__, "slide_shift": 0.5}))
    pd.testing.assert_frame_equal(plain.table, shifted.table)  # the same cohort ...
    offsets = []
    for before, after in zip(plain.features, shifted.features, strict=True):
        offset = after - before  # ... plus one offset per slide, of norm 0.5 · signal
        np.testing.assert_allclose(offset, offset[:1].repeat(len(offset), 0), atol=1e-5)
        assert np.linalg.norm(offset[0]) == pytest.approx(2.0, rel=1e-4)
        offsets.append(offset[0])
    assert np.abs(np.corrcoef(offsets[0], offsets[1])[0, 1]) < 0.9  # directions differ


def test_class_weights_are_recorded_and_logged_per_fine_class(cohort, tmp_path, caplog):
    out = tmp_path / "weighted"
    with caplog.at_level("INFO", logger="hmil.train"):
        assert main(train_args(cohort, out, "--class-weights", "balanced", model="abmil")) == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["class_weights"] == "balanced"
    # two training slides of each of the four classes: every weight is n / (C n_c) = 1
    logged = [r.getMessage() for r in caplog.records if "class weights" in r.getMessage()]
    classes = load_hierarchy(cohort["hierarchy"]).fine  # a Path, as tests hold it
    assert logged == ["class weights (balanced): " + ", ".join(f"{c} 1.00" for c in classes)]


def test_hmil_mb_trains_without_the_contrastive_term_unless_asked(cohort, tmp_path):
    own, whole = tmp_path / "own", tmp_path / "whole"
    assert main(train_args(cohort, own)) == 0
    assert main(train_args(cohort, whole, "--loss-preset", "hmil")) == 0
    recorded = json.loads((own / "metrics.json").read_text())["config"]
    assert recorded["loss_preset"] == "hmil_mb"
    assert "train_contrastive" not in pd.read_csv(own / "log.csv")
    assert "train_bag_alignment" in pd.read_csv(own / "log.csv")
    assert (pd.read_csv(whole / "log.csv")["train_contrastive"] > 0).all()


def test_a_preset_changes_only_what_it_names_of_the_models_own_loss():
    # an ablation of hmil_mb keeps hmil_mb's loss otherwise (no contrastive term) ...
    ablated = model_loss("no_bag_alignment", "hmil_mb")
    assert ablated.bag_alignment == 0 and ablated.contrastive == 0
    assert ablated.instance_alignment == 1.0 and ablated.coarse_ce == "curriculum"
    # ... the hmil preset names every HMIL term: the method's whole loss on any HMIL model
    assert model_loss("hmil", "hmil_mb") == LossConfig() == model_loss("hmil", "hmil")
    # flat is fine CE alone on every model, and a baseline keeps its own terms otherwise
    assert model_loss("flat", "clam") == model_loss("flat", "dsmil") == LossConfig.preset("flat")
    clam = model_loss("no_contrastive", "clam")
    assert (clam.fine_ce, clam.instance, clam.coarse_ce) == (0.7, 0.3, 0.0)
