"""The bag dataset: what it yields, and the errors that name the slide."""

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from hmil.data.bags import BagDataset, BagError, collate_bags, rebuild_hint, shard_record_of


def write_h5(directory: Path, slide_id: str, features: np.ndarray, feature_dim=None) -> Path:
    path = directory / f"{slide_id}.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("features", data=features)
        file.create_dataset("coords", data=np.zeros((len(features), 2), dtype=np.int64))
        file.attrs["encoder"] = "test"
        file.attrs["feature_dim"] = features.shape[1] if feature_dim is None else feature_dim
    return path


def table(*rows: tuple[str, str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["slide_id", "label"])


def features(num_instances: int, dim: int = 6, offset: float = 0.0) -> np.ndarray:
    values = np.arange(num_instances * dim, dtype=np.float32).reshape(num_instances, dim)
    return values + offset


def test_dataset_yields_features_and_label_indices_from_h5_and_pt(tmp_path, tiny_hierarchy):
    write_h5(tmp_path, "s1", features(3))
    torch.save(torch.from_numpy(features(5, offset=0.5)).double(), tmp_path / "s2.pt")
    dataset = BagDataset(table(("s1", "b1"), ("s2", "a2")), tmp_path, tiny_hierarchy)

    assert len(dataset) == 2
    assert dataset.feature_dim == 6
    assert dataset.num_patches.tolist() == [3, 5]
    bag_features, fine, coarse, slide_id = dataset[0]
    assert (fine, coarse, slide_id) == (2, 1, "s1")
    assert bag_features.dtype == torch.float32
    np.testing.assert_array_equal(bag_features.numpy(), features(3))
    second = dataset[1]
    assert (second.fine_label, second.coarse_label, second.slide_id) == (1, 0, "s2")
    assert second.features.dtype == torch.float32
    np.testing.assert_array_equal(second.features.numpy(), features(5, offset=0.5))


def test_collate_keeps_bags_of_different_sizes_whole(tmp_path, tiny_hierarchy):
    write_h5(tmp_path, "s1", features(3))
    write_h5(tmp_path, "s2", features(7))
    dataset = BagDataset(table(("s1", "a1"), ("s2", "b2")), tmp_path, tiny_hierarchy)
    batch = collate_bags([dataset[0], dataset[1]])
    assert [tuple(f.shape) for f in batch.features] == [(3, 6), (7, 6)]
    assert batch.fine_labels.tolist() == [0, 3]
    assert batch.coarse_labels.tolist() == [0, 1]
    assert batch.slide_ids == ["s1", "s2"]


def test_cache_serves_a_bag_again_without_reading_the_file(tmp_path, tiny_hierarchy):
    path = write_h5(tmp_path, "s1", features(3))
    dataset = BagDataset(table(("s1", "a1")), tmp_path, tiny_hierarchy, cache=True)
    first = dataset[0].features
    path.unlink()
    assert dataset[0].features is first


def test_missing_feature_file_names_the_slide(tmp_path, tiny_hierarchy):
    write_h5(tmp_path, "s1", features(3))
    with pytest.raises(BagError, match=r"slide 'lost': no feature file .*lost\.h5 \(or \.pt\)"):
        BagDataset(table(("s1", "a1"), ("lost", "a1")), tmp_path, tiny_hierarchy)


def test_unknown_label_names_the_slide(tmp_path, tiny_hierarchy):
    write_h5(tmp_path, "s1", features(3))
    with pytest.raises(BagError, match=r"slide 's1': unknown fine label 'c9'"):
        BagDataset(table(("s1", "c9")), tmp_path, tiny_hierarchy)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_features_name_the_slide_and_count_rows(tmp_path, tiny_hierarchy, bad_value):
    values = features(4)
    values[2, 1] = bad_value
    write_h5(tmp_path, "s1", features(3))
    write_h5(tmp_path, "bad", values)
    dataset = BagDataset(table(("s1", "a1"), ("bad", "a1")), tmp_path, tiny_hierarchy)
    dataset[0]
    with pytest.raises(BagError, match=r"slide 'bad' \(.*bad\.h5\): 1 of 4 feature rows contain"):
        dataset[1]


def test_empty_bag_names_the_slide_when_the_dataset_is_built(tmp_path, tiny_hierarchy):
    write_h5(tmp_path, "s1", features(3))
    write_h5(tmp_path, "empty", np.zeros((0, 6), dtype=np.float32))
    with pytest.raises(BagError, match=r"slide 'empty' \(.*empty\.h5\): empty bag"):
        BagDataset(table(("s1", "a1"), ("empty", "b1")), tmp_path, tiny_hierarchy)


def test_empty_pt_bag_names_the_slide(tmp_path, tiny_hierarchy):
    torch.save(torch.zeros(0, 6), tmp_path / "empty.pt")
    with pytest.raises(BagError, match=r"slide 'empty' \(.*empty\.pt\): empty bag"):
        BagDataset(table(("empty", "b1")), tmp_path, tiny_hierarchy)


def test_feature_dimension_mismatch_names_the_odd_slide(tmp_path, tiny_hierarchy):
    for slide_id in ("s1", "s2", "s3"):
        write_h5(tmp_path, slide_id, features(3, dim=6))
    write_h5(tmp_path, "odd", features(3, dim=8))
    rows = table(("odd", "a1"), ("s1", "a1"), ("s2", "a2"), ("s3", "b1"))
    with pytest.raises(
        BagError, match=r"slide 'odd' \(.*odd\.h5\): feature dimension 8 differs from 6"
    ):
        BagDataset(rows, tmp_path, tiny_hierarchy)


def test_feature_dimension_other_than_expected_names_the_slide(tmp_path, tiny_hierarchy):
    write_h5(tmp_path, "s1", features(3, dim=6))
    with pytest.raises(BagError, match=r"slide 's1'.*dimension 6 differs from 1024 expected"):
        BagDataset(table(("s1", "a1")), tmp_path, tiny_hierarchy, feature_dim=1024)


def test_feature_dim_attribute_contradicting_the_data_names_the_slide(tmp_path, tiny_hierarchy):
    write_h5(tmp_path, "s1", features(3, dim=6), feature_dim=1024)
    with pytest.raises(BagError, match=r"slide 's1' .*feature_dim=1024 but 'features' has 6"):
        BagDataset(table(("s1", "a1")), tmp_path, tiny_hierarchy)


def test_table_without_label_column_is_rejected(tmp_path, tiny_hierarchy):
    with pytest.raises(BagError, match="missing column 'label'"):
        BagDataset(pd.DataFrame({"slide_id": ["s1"]}), tmp_path, tiny_hierarchy)


def test_duplicate_slide_id_is_rejected(tmp_path, tiny_hierarchy):
    write_h5(tmp_path, "s1", features(3))
    with pytest.raises(BagError, match="slide 's1' appears more than once"):
        BagDataset(table(("s1", "a1"), ("s1", "a1")), tmp_path, tiny_hierarchy)


@pytest.mark.parametrize("suffix", [".h5", ".pt"])
def test_unreadable_feature_file_is_one_line_naming_the_slide(tmp_path, tiny_hierarchy, suffix):
    (tmp_path / f"broken{suffix}").write_bytes(b"not a feature file")
    with pytest.raises(BagError, match=r"slide 'broken' \(.*broken\..*\): cannot read") as error:
        BagDataset(table(("broken", "a1")), tmp_path, tiny_hierarchy)
    assert "\n" not in str(error.value)


def test_rebuild_hint_names_the_shard_record_listing_the_slide(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    pd.DataFrame({"slide_id": ["a", "b"], "status": "ok"}).to_csv(shards / "shard0.csv")
    pd.DataFrame({"slide_id": ["c"], "status": "failed"}).to_csv(shards / "shard1.csv")
    (shards / "shard2.csv").write_text("")  # a record cut short is passed over
    assert shard_record_of(tmp_path / "c.h5") == shards / "shard1.csv"
    assert rebuild_hint(tmp_path / "a.pt").endswith(f"--forcerun {shards / 'shard0.csv'})")
    # no record lists it (features made by hand, or a deployed cohort): the file itself
    assert shard_record_of(tmp_path / "d.h5") is None
    assert rebuild_hint(tmp_path / "d.h5").endswith(f"--forcerun {tmp_path / 'd.h5'})")
