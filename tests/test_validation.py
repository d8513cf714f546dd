"""Great Expectations suites: good data passes; each defect fails naming the expectation and rows."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pxpo.errors import PxpoInputError
from pxpo.validation import ValidationFailed, check, validate_prompts, validate_reward_maps, validate_trajectories


def _prompts(**over):
    d = {"prompt": ["a cat", "a dog", "a bird", "a fish"], "weight": [1.0, 2.0, 1.0, 1.0], "split": ["train", "train", "train", "heldout"]}
    d.update(over)
    return pd.DataFrame(d)


def _failed(report):
    return {f.expectation: f for f in report.failures}


def test_good_prompts_pass():
    r = validate_prompts(_prompts())
    assert r.success and r.evaluated >= 8, r.summary()


def test_duplicate_prompts_fail_with_both_rows():
    r = validate_prompts(_prompts(prompt=["a cat", "A  Cat", "a bird", "a fish"]))
    f = _failed(r)["expect_column_values_to_be_unique"]
    assert sorted(f.unexpected_rows) == [0, 1]
    assert "unique" in r.summary() and "rows [0, 1]" in r.summary()


def test_empty_prompt_bad_weight_bad_split_fail():
    r = validate_prompts(_prompts(prompt=["a cat", "", "a bird", "a fish"], weight=[1.0, 1.0, -2.0, 1.0], split=["train", "train", "test", "heldout"]))
    f = _failed(r)
    assert f["expect_column_value_lengths_to_be_between"].unexpected_rows == [1]
    assert f["expect_column_values_to_be_between"].unexpected_rows == [2]
    assert f["expect_column_values_to_be_in_set"].unexpected_values == ["test"]


def test_heldout_size_checked():
    r = validate_prompts(_prompts(split=["train"] * 4))
    assert not r.success and "held-out" in r.summary()
    r = validate_prompts(_prompts(split=["heldout"] * 3 + ["train"]))
    assert not r.success and "observed 0.75" in r.summary()


def test_missing_column_fails():
    r = validate_prompts(pd.DataFrame({"prompt": ["x"]}))
    assert not r.success and "weight" in r.summary()


def test_schema_uses_ge_table_expectations():
    """Missing columns fail GE's ExpectTableColumnsToMatchSet and ExpectColumnToExist (one per column), exit 2."""
    r = validate_prompts(pd.DataFrame({"prompt": ["a cat", "a cat"], "extra": [1, 2]}))
    by_type = {}
    for f in r.failures:
        by_type.setdefault(f.expectation, []).append(f)
    assert not r.success
    assert by_type["expect_table_columns_to_match_set"][0].observed == {"missing": ["split", "weight"]}
    assert sorted(f.column for f in by_type["expect_column_to_exist"]) == ["split", "weight"]
    # the present column's row expectations still run (and name the rows); the missing ones' are left out
    assert by_type["expect_column_values_to_be_unique"][0].unexpected_rows == [0, 1]
    assert not any(f.column in ("weight", "split") for t, fs in by_type.items() if t != "expect_column_to_exist" for f in fs)
    summary = r.summary()
    assert "(expect_column_to_exist on 'weight')" in summary and "(expect_table_columns_to_match_set)" in summary
    with pytest.raises(ValidationFailed) as e:
        check(r, None)
    assert e.value.exit_code == 2 and "expect_column_to_exist" in str(e.value)
    # extra columns are allowed; the expectations are evaluated, not skipped
    ok = validate_prompts(_prompts(source=["a", "b", "c", "d"]))
    assert ok.success, ok.summary()
    types = [x["expectation_config"]["type"] for x in ok.ge_result["results"]]
    assert "expect_table_columns_to_match_set" in types and types.count("expect_column_to_exist") == 3


def test_reward_maps():
    good = torch.rand(3, 16, 16)
    assert validate_reward_maps(good, num_samples=3, height=16, width=16, value_range=(0, 1)).success
    bad = good.clone()
    bad[1, 2, 3] = float("nan")
    r = validate_reward_maps(bad, num_samples=3, height=16, width=16)
    assert not r.success and r.failures[0].unexpected_rows == [1]
    assert not validate_reward_maps(good, num_samples=4, height=16, width=16).success
    assert not validate_reward_maps(good, num_samples=3, height=8, width=16).success
    r = validate_reward_maps(good * 3, num_samples=3, height=16, width=16, value_range=(0, 1))
    assert not r.success and "<= 1" in r.summary()


def test_trajectories():
    lat, lp, ts = torch.randn(2, 5, 4, 8, 8), torch.randn(2, 4, 4, 8, 8), torch.arange(4)
    assert validate_trajectories(lat, lp, ts, num_samples=2).success
    lp[1, 0, 0, 0, 0] = float("inf")
    r = validate_trajectories(lat, lp, ts)
    assert not r.success and r.failures[0].unexpected_rows == [1]


def test_check_saves_and_raises(tmp_path):
    r = validate_prompts(_prompts(prompt=["a", "a", "b", "c"]))
    with pytest.raises(ValidationFailed) as e:
        check(r, tmp_path / "v.json")
    assert isinstance(e.value, PxpoInputError) and str(tmp_path / "v.json") in str(e.value)
    saved = json.loads((tmp_path / "v.json").read_text())
    assert saved["success"] is False and saved["failures"][0]["unexpected_rows"] == [0, 1] and "ge_result" in saved
    ok = validate_prompts(_prompts())
    check(ok, tmp_path / "ok.json")
    assert json.loads((tmp_path / "ok.json").read_text())["success"] is True


def test_ge_worker_process_gives_the_same_report(monkeypatch):
    """Suites run in the spawned GE worker give the report the in-process run gives."""
    import os
    from dataclasses import asdict

    import pxpo.validation as v

    df = _prompts(prompt=["a cat", "A  Cat", "a bird", "a fish"])
    v.stop_worker()
    inline = v.validate_prompts(df)
    v.start_worker()
    try:
        assert v._POOL is not None
        assert v._POOL.submit(os.getpid).result() != os.getpid()
        remote = v.validate_prompts(df)
        ok = v.validate_prompts(_prompts())
    finally:
        v.stop_worker()
    assert inline.success is False and remote.success is False and ok.success
    assert [asdict(f) for f in remote.failures] == [asdict(f) for f in inline.failures]
    assert remote.evaluated == inline.evaluated


def test_ge_worker_can_be_turned_off(monkeypatch):
    import pxpo.validation as v

    v.stop_worker()
    monkeypatch.setenv("PXPO_GE_WORKER", "0")
    v.start_worker()
    assert v._POOL is None
