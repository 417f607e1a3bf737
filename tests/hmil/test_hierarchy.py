"""Hierarchy files: presets, lookups and the validation messages."""

from pathlib import Path

import numpy as np
import pytest

from hmil.data.hierarchy import Hierarchy, HierarchyError


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hierarchy.yaml"
    path.write_text(text)
    return path


def test_bracs_preset_has_the_papers_classes_and_grouping():
    bracs = Hierarchy.preset("bracs")
    assert bracs.name == "bracs"
    assert bracs.fine == ("N", "PB", "UDH", "FEA", "ADH", "DCIS", "IC")
    assert bracs.coarse == ("benign", "atypical", "malignant")
    assert bracs.fine_to_coarse.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert bracs.coarse_of("ADH") == "atypical"
    assert bracs.fine_index("DCIS") == 5


def test_panda_preset_groups_isup_grades_and_accepts_integer_labels():
    panda = Hierarchy.preset("panda")
    assert panda.fine == ("0", "1", "2", "3", "4", "5")
    assert panda.fine_to_coarse.tolist() == [0, 1, 1, 2, 2, 2]
    # pandas reads an ISUP column as int (or float when it has gaps)
    assert panda.fine_index(3) == 3
    assert panda.fine_index(np.int64(4)) == 4
    assert panda.fine_index(5.0) == 5


def test_ccc_preset_is_nilm_versus_abnormal():
    ccc = Hierarchy.preset("ccc")
    assert ccc.fine == ("NILM", "ASC-US", "LSIL", "ASC-H", "HSIL", "SCC")
    assert ccc.coarse == ("NILM", "abnormal")
    assert ccc.fine_to_coarse.tolist() == [0, 1, 1, 1, 1, 1]


def test_membership_matrix_puts_each_fine_class_in_its_coarse_column(tiny_hierarchy):
    expected = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32)
    np.testing.assert_array_equal(tiny_hierarchy.membership_matrix, expected)
    np.testing.assert_array_equal(tiny_hierarchy.membership_tensor().numpy(), expected)


def test_yaml_file_round_trip_keeps_the_fine_order(tmp_path):
    path = write_yaml(tmp_path, "name: t\ncoarse: [y, x]\nfine:\n  c: x\n  a: y\n  b: x\n")
    hierarchy = Hierarchy.from_yaml(path)
    assert hierarchy.fine == ("c", "a", "b")
    assert hierarchy.coarse == ("y", "x")
    assert hierarchy.fine_to_coarse.tolist() == [1, 0, 1]


def test_duplicate_fine_class_is_rejected_naming_the_file(tmp_path):
    path = write_yaml(tmp_path, "coarse: [x, y]\nfine:\n  a: x\n  b: y\n  a: y\n")
    with pytest.raises(HierarchyError, match=r"hierarchy\.yaml: line 5: duplicate name 'a'"):
        Hierarchy.from_yaml(path)


def test_duplicate_coarse_class_is_rejected_naming_the_file(tmp_path):
    path = write_yaml(tmp_path, "coarse: [x, y, x]\nfine:\n  a: x\n  b: y\n")
    with pytest.raises(HierarchyError, match=r"hierarchy\.yaml: duplicate coarse class 'x'"):
        Hierarchy.from_yaml(path)


def test_fine_class_mapped_to_unknown_coarse_class_is_rejected(tmp_path):
    path = write_yaml(tmp_path, "coarse: [x, y]\nfine:\n  a: x\n  b: z\n")
    with pytest.raises(
        HierarchyError, match=r"hierarchy\.yaml: fine class 'b' maps to unknown coarse class 'z'"
    ):
        Hierarchy.from_yaml(path)


def test_fine_class_mapped_to_two_coarse_classes_is_rejected(tmp_path):
    path = write_yaml(tmp_path, "coarse: [x, y]\nfine:\n  a: [x, y]\n  b: y\n")
    with pytest.raises(HierarchyError, match="fine class 'a' must map to exactly one coarse"):
        Hierarchy.from_yaml(path)


def test_coarse_class_without_fine_class_is_rejected(tmp_path):
    path = write_yaml(tmp_path, "coarse: [x, y, empty]\nfine:\n  a: x\n  b: y\n")
    with pytest.raises(HierarchyError, match="coarse class 'empty' has no fine class"):
        Hierarchy.from_yaml(path)


def test_a_single_fine_class_is_rejected(tmp_path):
    path = write_yaml(tmp_path, "coarse: [x]\nfine:\n  a: x\n")
    with pytest.raises(HierarchyError, match="needs at least 2 fine classes, got 1"):
        Hierarchy.from_yaml(path)


def test_unquoted_yaml_boolean_class_name_asks_for_quotes(tmp_path):
    path = write_yaml(tmp_path, "coarse: [x, y]\nfine:\n  yes: x\n  b: y\n")
    with pytest.raises(HierarchyError, match="class name True is not a string; quote it"):
        Hierarchy.from_yaml(path)


def test_missing_file_is_reported_as_hierarchy_error(tmp_path):
    with pytest.raises(HierarchyError, match=r"absent\.yaml: cannot read hierarchy file"):
        Hierarchy.from_yaml(tmp_path / "absent.yaml")


def test_unknown_label_error_lists_the_known_classes(tiny_hierarchy):
    with pytest.raises(
        HierarchyError,
        match=r"unknown fine label 'c1' for hierarchy 'tiny' \(expected one of: a1, a2, b1, b2\)",
    ):
        tiny_hierarchy.fine_index("c1")
    with pytest.raises(HierarchyError, match="unknown fine label 'zz'"):
        tiny_hierarchy.check_labels(["a1", "b2", "zz"])
    assert issubclass(HierarchyError, ValueError)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(HierarchyError, match=r"unknown hierarchy preset 'nope' \(presets: .*bracs"):
        Hierarchy.preset("nope")
