"""`pxpo prepare`: normalise, dedupe, split, validate, write a versioned dataset (or nothing)."""

import json

import pytest

from pxpo.cli import main
from pxpo.prompts import load_weighted_prompts


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_prepare_dedupes_splits_and_versions(tmp_path, capsys):
    src = tmp_path / "p.csv"
    src.write_text("prompt,weight,split\na cat,1,train\nA  Cat ,2,train\na dog,1,heldout\na bird,3,\na fish,1,train\n")
    assert main(["prepare", "--input", str(src), "--out", str(tmp_path / "ds")]) == 0
    info = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert info["duplicates_removed"] == 1 and info["removed"] == ["A Cat"]
    assert info["counts"]["train"] + info["counts"]["heldout"] == 4 and len(info["version"]) == 64
    prompts, weights = load_weighted_prompts(str(tmp_path / "ds"))
    assert "a cat" in prompts and "a dog" not in prompts
    assert load_weighted_prompts(str(tmp_path / "ds"), split="heldout")[0][0] == "a dog"
    assert weights[prompts.index("a cat")] == 1.0
    # same content -> same version; the report says it passed
    assert main(["prepare", "--input", str(src), "--out", str(tmp_path / "ds2")]) == 0
    assert json.loads((tmp_path / "ds2" / "dataset.json").read_text())["version"] == info["version"]
    assert json.loads((tmp_path / "ds.validation.json").read_text())["success"] is True


def test_failed_validation_writes_report_not_dataset(tmp_path, capsys):
    src = tmp_path / "p.csv"
    src.write_text("prompt,weight,split\na cat,1,train\n,1,train\na dog,-1,train\n")
    code = main(["prepare", "--input", str(src), "--out", str(tmp_path / "ds")])
    err = capsys.readouterr().err
    assert code == 2
    assert "validation suite 'prompts'" in err and "weights must be > 0" in err and "held-out" in err
    # each failure names its expectation and the offending rows
    assert "(expect_column_values_to_be_between on 'weight'): rows [2]" in err
    assert "(expect_column_value_lengths_to_be_between on 'prompt'): rows [1]" in err
    assert not (tmp_path / "ds").exists()
    report = json.loads((tmp_path / "ds.validation.json").read_text())
    assert report["success"] is False and report["failures"]


def test_unreadable_input_named(tmp_path, capsys):
    assert main(["prepare", "--input", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "ds")]) == 2
    assert "nope.csv" in capsys.readouterr().err
    bad = tmp_path / "p.csv"
    bad.write_text("text\nhello\n")
    assert main(["prepare", "--input", str(bad), "--out", str(tmp_path / "ds")]) == 2
    assert "column 'prompt'" in capsys.readouterr().err
