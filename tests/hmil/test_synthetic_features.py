"""The synthetic hierarchical benchmark: determinism, its structure, and its files."""

import h5py
import numpy as np
import pandas as pd

from hmil.data.bags import BagDataset
from hmil.data.synthetic import SyntheticConfig, generate_cohort, write_cohort
from hmil.synthetic_features import main

SMALL = SyntheticConfig(bags_per_class=3, feature_dim=16, min_instances=40, max_instances=80)


def test_same_seed_gives_the_same_cohort_and_another_seed_does_not(tiny_hierarchy):
    first, again = generate_cohort(tiny_hierarchy, SMALL), generate_cohort(tiny_hierarchy, SMALL)
    pd.testing.assert_frame_equal(first.table, again.table)
    for a, b in zip(first.features, again.features, strict=True):
        np.testing.assert_array_equal(a, b)
    other = generate_cohort(tiny_hierarchy, SyntheticConfig(**{**SMALL.__dict__, "seed": 1}))
    assert not np.array_equal(first.features[0][:5], other.features[0][:5])


def test_every_fine_class_gets_its_bags_with_a_few_key_instances(tiny_hierarchy):
    cohort = generate_cohort(tiny_hierarchy, SMALL)
    assert cohort.table["label"].value_counts().to_dict() == {"a1": 3, "a2": 3, "b1": 3, "b2": 3}
    assert (cohort.table["coarse_label"] == cohort.table["label"].str[0].str.upper()).all()
    for bag_features, is_key in zip(cohort.features, cohort.key_instances, strict=True):
        assert bag_features.dtype == np.float32 and bag_features.shape[1] == 16
        assert 40 <= len(bag_features) <= 80
        assert 1 <= is_key.sum() <= round(0.10 * len(is_key))


def test_key_instances_carry_the_class_mean_and_the_rest_is_noise(tiny_hierarchy):
    config = SyntheticConfig(bags_per_class=40, feature_dim=16, seed=3)
    cohort = generate_cohort(tiny_hierarchy, config)
    labels = cohort.table["label"].map(tiny_hierarchy.fine_index).to_numpy()
    key = np.concatenate(
        [
            f[k] - cohort.class_means[y]
            for f, k, y in zip(cohort.features, cohort.key_instances, labels, strict=True)
        ]
    )
    background = np.concatenate(
        [f[~k] for f, k in zip(cohort.features, cohort.key_instances, strict=True)]
    )
    # after removing the class mean, key instances are noise like the background
    assert np.abs(key.mean(axis=0)).max() < 0.15
    assert np.abs(background.mean(axis=0)).max() < 0.05
    assert abs(background.std() - 1.0) < 0.02


def test_fine_classes_of_one_coarse_group_are_close_and_groups_are_apart(tiny_hierarchy):
    cohort = generate_cohort(tiny_hierarchy, SMALL)
    means = cohort.class_means
    np.testing.assert_allclose(np.linalg.norm(means, axis=1), SMALL.signal, rtol=1e-5)
    cosine = (means @ means.T) / SMALL.signal**2
    within = 1 / (1 + SMALL.fine_offset**2)  # orthonormal directions: cos = 1/(1 + δ²)
    np.testing.assert_allclose([cosine[0, 1], cosine[2, 3]], within, rtol=1e-5)
    np.testing.assert_allclose([cosine[0, 2], cosine[1, 3]], 0.0, atol=1e-6)


def test_slides_of_one_patient_share_a_label(tiny_hierarchy):
    config = SyntheticConfig(bags_per_class=4, feature_dim=8, slides_per_patient=2)
    table = generate_cohort(tiny_hierarchy, config).table
    assert table["patient_id"].nunique() == 8
    assert (table.groupby("patient_id")["label"].nunique() == 1).all()


def test_written_cohort_loads_as_bags(tmp_path, tiny_hierarchy):
    cohort = generate_cohort(tiny_hierarchy, SMALL)
    table_path = write_cohort(cohort, tmp_path / "features")
    table = pd.read_csv(table_path)
    assert list(table.columns) == ["slide_id", "patient_id", "label", "coarse_label"]
    first = table["slide_id"][0]
    with h5py.File(tmp_path / "features" / f"{first}.h5") as file:
        assert file.attrs["encoder"] == "synthetic"
        assert file.attrs["feature_dim"] == 16
        assert file["coords"].shape == (len(cohort.features[0]), 2)
        assert file["coords"].dtype == np.int64
    dataset = BagDataset(table, tmp_path / "features", tiny_hierarchy)
    assert dataset.feature_dim == 16
    np.testing.assert_array_equal(dataset[0].features.numpy(), cohort.features[0])
    assert dataset[0].fine_label == tiny_hierarchy.fine_index(table["label"][0])
    assert not list((tmp_path / "features").glob("*.tmp-*"))


def test_command_line_writes_a_cohort_and_reports_bad_hierarchy(tmp_path, capsys):
    hierarchy = tmp_path / "h.yaml"
    hierarchy.write_text("coarse: [x, y]\nfine:\n  a: x\n  b: y\n")
    assert (
        main(
            [
                "--hierarchy",
                str(hierarchy),
                "--out",
                str(tmp_path / "out"),
                "--bags-per-class",
                "2",
                "--feature-dim",
                "4",
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "out").glob("*.h5"))) == 4
    hierarchy.write_text("coarse: [x]\nfine:\n  a: z\n")
    assert main(["--hierarchy", str(hierarchy), "--out", str(tmp_path / "bad")]) == 1
    assert "unknown coarse class 'z'" in capsys.readouterr().err
