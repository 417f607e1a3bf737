"""The slide sheet: clear errors for malformed sheets, paths relative to the sheet."""

from __future__ import annotations

import pytest

from plumbing.errors import SheetError
from preprocessing.slides.sheet import read_slide_sheet


def write(tmp_path, text):
    path = tmp_path / "slides.csv"
    path.write_text(text)
    return path


def test_relative_paths_resolve_against_the_sheet_folder(tmp_path):
    sheet = read_slide_sheet(
        write(
            tmp_path,
            "slide_id,path,patient_id,label,mpp\na,x/a.svs,p1,IC,0.25\nb,/abs/b.svs,p1,N,\n",
        )
    )
    assert sheet.loc["a", "path"] == str(tmp_path / "x" / "a.svs")
    assert sheet.loc["b", "path"] == "/abs/b.svs"
    assert sheet.loc["a", "mpp"] == 0.25 and sheet["mpp"].isna().sum() == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("slide_id,path,label\na,a.svs,IC\n", "missing column(s) patient_id"),
        ("slide_id,path,patient_id,label\na,a.svs,p,IC\na,b.svs,q,N\n", "duplicate slide_id(s): a"),
        ("slide_id,path,patient_id,label\na/b,a.svs,p,IC\n", "not usable as file names"),
        ("slide_id,path,patient_id,label\na,,p,IC\n", "empty `path` on line(s) 2"),
        (
            "slide_id,path,patient_id,label,mpp\na,a.svs,p,IC,-1\n",
            "`mpp` must be a positive number",
        ),
        ("slide_id,path,patient_id,label\n", "no slides"),
    ],
)
def test_malformed_sheets_give_one_clear_message(tmp_path, text, message):
    with pytest.raises(SheetError) as caught:
        read_slide_sheet(write(tmp_path, text))
    assert message in str(caught.value)
    assert str(caught.value).startswith(str(tmp_path / "slides.csv"))
