"""The promotion gates fail closed and say which one failed (pxpo.mlflow.gates, promotion, register_policy).

A NaN, infinite, missing or non-numeric value fails its gate with a message
naming the metric, the file it came from and the threshold's config field; a
refused challenger's reason names only the gates that failed.
"""

import json
import math
import shutil
from pathlib import Path

import pytest

import prereq
from pxpo.mlflow.gates import champion_gate, check_number, passes
from pxpo.mlflow.promotion import format_summary, gold_gate, read_validation_reports

NAN, INF = float("nan"), float("inf")


# ----- the one comparison ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, op, limit, ok, message", [
    (0.1, "<=", 0.3, True, "drift_pixel_l1 0.1000 <= register.max_drift 0.3"),
    (0.4, "<=", 0.3, False, "drift_pixel_l1 0.4000 > register.max_drift 0.3"),
    (0.3, "<=", 0.3, True, "drift_pixel_l1 0.3000 <= register.max_drift 0.3"),
    (0.0, ">", 0.0, False, "drift_pixel_l1 0.0000 <= register.max_drift 0.0"),
    (1, ">=", 1, True, "drift_pixel_l1 1.0000 >= register.max_drift 1"),
    (0.5, "<", 0.3, False, "drift_pixel_l1 0.5000 >= register.max_drift 0.3"),
    (0.5, "<=", INF, True, "drift_pixel_l1 0.5000 <= register.max_drift inf"),  # an infinite bound is a bound
    (0.5, ">", INF, False, "drift_pixel_l1 0.5000 <= register.max_drift inf"),
])
def test_passes_compares(value, op, limit, ok, message):
    assert passes(value, op, limit, "drift_pixel_l1", limit_name="register.max_drift", source="eval/metrics.json") == (ok, message)


@pytest.mark.parametrize("op", [">", ">=", "<", "<="])
@pytest.mark.parametrize("value, says", [
    (NAN, "drift_pixel_l1 is NaN in eval/metrics.json"),
    (INF, "drift_pixel_l1 is inf in eval/metrics.json"),
    (-INF, "drift_pixel_l1 is -inf in eval/metrics.json"),
    (None, "drift_pixel_l1 is missing from eval/metrics.json"),
    ("0.1", "drift_pixel_l1 is '0.1' in eval/metrics.json, not a number"),
    (True, "drift_pixel_l1 is True in eval/metrics.json, not a number"),
])
def test_passes_fails_closed_on_a_bad_value_whatever_the_direction(value, says, op):
    ok, message = passes(value, op, 0.3, "drift_pixel_l1", limit_name="register.max_drift", source="eval/metrics.json")
    assert not ok and message == f"{says}: register.max_drift 0.3 fails closed"


@pytest.mark.parametrize("limit", [NAN, None, "0.3"])
def test_passes_fails_closed_on_a_bad_limit(limit):
    ok, message = passes(0.1, "<=", limit, "drift_pixel_l1", limit_name="register.max_drift")
    assert not ok and message == f"register.max_drift is {limit!r}, not a number: no drift_pixel_l1 passes it"


def test_check_number():
    assert check_number(2, "x") == (2.0, None) and check_number(0.5, "x", "f.json") == (0.5, None)
    assert check_number(NAN, "x") == (None, "x is NaN") and check_number(None, "x") == (None, "x is missing")


@pytest.mark.parametrize("challenger, champion, champion_version, higher, expected", [
    (0.7, 0.6, None, True, (None, "no champion yet")),
    (0.7, NAN, "3", True, (None, "v3 already is the champion")),
    (0.7, 0.6, "2", True, (None, "reward_mean 0.7000 vs champion v2 0.6000: improvement +0.1000 > register.margin 0.05")),
    (0.62, 0.6, "2", True, ("register.margin", "reward_mean 0.6200 vs champion v2 0.6000: improvement +0.0200 <= register.margin 0.05")),
    (0.5, 0.6, "2", False, (None, "reward_mean 0.5000 vs champion v2 0.6000: improvement +0.1000 > register.margin 0.05")),
    (0.7, 0.6, "2", False, ("register.margin", "reward_mean 0.7000 vs champion v2 0.6000: improvement -0.1000 <= register.margin 0.05")),
    (NAN, 0.6, None, True, ("register.primary_metric", "reward_mean is NaN in m.json: not comparable with a champion")),
    (-INF, 0.6, "2", False, ("register.primary_metric", "reward_mean is -inf in m.json: not comparable with a champion")),
    (0.7, NAN, "2", True, ("register.margin", "champion v2's reward_mean is NaN in its logged model's metrics: not comparable; move the alias by hand")),
    (0.7, None, "2", True, ("register.margin", "champion v2's reward_mean is missing from its logged model's metrics: not comparable; move the alias by hand")),
])
def test_champion_gate(challenger, champion, champion_version, higher, expected):
    assert champion_gate(challenger, champion, version="3", champion_version=champion_version, primary_metric="reward_mean",
                         higher_is_better=higher, margin=0.05, field_prefix="register.", source="m.json") == expected


# ----- gold gate and validation reports (no MLflow) ----------------------------------------------------------


def test_gold_gate_fails_closed_on_nan_and_missing_values():
    m = {"gold": {"fid": {"base": 0.9, "policy": NAN}, "sharp": {"base": 0.5, "policy": 0.52}, "dark": {"policy": 0.3}}}
    ok, text = gold_gate(m, 0.05, "eval/metrics.json")
    assert not ok
    failed = text.split("; ")[:2]  # the failing ones first
    assert failed == ["gold fid policy is NaN in eval/metrics.json (gold.fid.policy): register.max_gold_drop 0.05 fails closed",
                      "gold dark base is missing from eval/metrics.json (gold.dark.base): register.max_gold_drop 0.05 fails closed"]
    assert text.endswith("gold sharp 0.5000 (base) -> 0.5200 (policy), drop -0.0200 <= register.max_gold_drop 0.05")
    ok, text = gold_gate(m, None, "eval/metrics.json")  # gate off: reported, not refused
    assert ok and "gold fid policy is NaN" in text
    assert not gold_gate({"gold": {"fid": {"base": INF, "policy": 0.5}}}, 0.05)[0]
    assert not gold_gate({"gold": {"fid": {"base": 0.9, "policy": 0.5}}}, NAN)[0]  # a NaN bound passes nothing
    assert not gold_gate({"gold": ["fid"]}, 0.05)[0] and gold_gate({"gold": ["fid"]}, None)[0]


def test_gold_gate_passes_within_the_bound():
    assert gold_gate({"gold": {"fid": {"base": 0.9, "policy": 0.88}}}, 0.05) == (
        True, "gold fid 0.9000 (base) -> 0.8800 (policy), drop +0.0200 <= register.max_gold_drop 0.05")


def test_validation_reports_pass_only_on_success_true(tmp_path):
    cases = {"ok": {"success": True}, "false": {"success": False}, "string": {"success": "false"}, "one": {"success": 1},
             "list": [True], "none": {}}
    for name, body in cases.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(body))
    (tmp_path / "bad.json").write_text("{")
    paths = [tmp_path / f"{n}.json" for n in [*cases, "bad", "absent"]]
    ok, failed = read_validation_reports(paths)
    assert not ok and [Path(f).stem for f in failed] == ["false", "string", "one", "list", "none", "bad", "absent"]
    assert read_validation_reports([tmp_path / "ok.json"]) == (True, []) and read_validation_reports([]) == (True, [])


def test_format_summary_survives_nan_and_missing_gold():
    s = format_summary({"train_reward": None, "heldout_reward": {"base": 0.1, "policy": NAN},
                        "gold": {"fid": {"base": 0.9, "policy": None}, "odd": 3}})
    assert s == "held-out 0.1000 (base) -> nan (policy); gold fid 0.9000 (base) -> None (policy)"


# ----- the register stage's decision (a real MLflow store; the policy is a stand-in file) --------------------


@pytest.fixture
def store(tmp_path, monkeypatch, mlflow_template_db):
    """A SQLite store under tmp_path/store, a copy of the session's migrated empty store (tests/conftest.py):
    MLflow's migrations run once, not per test."""
    mlflow = prereq.import_module("mlflow", "pinned in requirements-lock.txt (bash scripts/setup.sh)")
    from pxpo.mlflow.tracking import default_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "store").mkdir()
    shutil.copyfile(mlflow_template_db, tmp_path / "store" / "mlruns.db")
    uri = default_tracking_uri(tmp_path / "store")
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


GOOD = {"reward_mean": 0.6, "base_reward_mean": 0.5, "reward_gain": 0.1, "drift_pixel_l1": 0.1, "num_samples": 4,
        "gold": {"fid": {"base": 0.9, "policy": 0.88}}}
GATES_ON = ["register.min_gain=0.05", "register.max_drift=0.3", "register.max_gold_drop=0.05", "evaluate.gold=[{name: digit_fidelity}]"]


@pytest.fixture
def decide(store, tmp_path):
    """decide(name, metrics, overrides=GATES_ON, reports=("ok",)) -> the register decision."""
    from pxpo.config import load_config
    from pxpo.mlflow.promotion import gate_and_register

    base = tmp_path / "base"
    base.mkdir()
    (base / "model_index.json").write_text("{}")
    (tmp_path / "prompts.txt").write_text("a handwritten digit 3\n")
    for name, body in {"ok": {"success": True}, "failed": {"success": False}}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(body))
    seen = {}

    def run(name, metrics, overrides=GATES_ON, reports=("ok",)):
        seen[name] = seen.get(name, 0) + 1
        tag = f"{name}-{seen[name]}"
        pol = tmp_path / f"pol-{tag}"
        (pol / "lora").mkdir(parents=True)
        (pol / "lora" / "pytorch_lora_weights.safetensors").write_bytes(tag.encode())  # a distinct stand-in per call
        ev = tmp_path / f"eval-{tag}"
        ev.mkdir()
        (ev / "metrics.json").write_text(json.dumps(metrics))  # NaN and Infinity as Python's json writes them
        cfg = load_config(None, [f"model.path={base}", f"register.model_name=pxpo-{name}", "register.experiment=gates", *overrides])
        return gate_and_register(cfg, policy_dir=pol, eval_dir=ev, tracking_uri=store, out=ev / "decision.json",
                                 validation_reports=[tmp_path / f"{r}.json" for r in reports], prompts=tmp_path / "prompts.txt")

    return run


def _with(**changes):
    """GOOD with some values changed (``gold_base``/``gold_policy``: of the gold reward ``fid``); ``...`` removes one."""
    m = json.loads(json.dumps(GOOD))
    for k, v in changes.items():
        d, k = (m["gold"]["fid"], k.removeprefix("gold_")) if k.startswith("gold_") else (m, k)
        if v is ...:
            del d[k]
        else:
            d[k] = v
    return m


@pytest.mark.parametrize("case, metrics, gate, says", [
    ("gain-nan", _with(reward_gain=NAN), "register.min_gain", "reward_gain is NaN in {file}: register.min_gain 0.05 fails closed"),
    ("gain-missing", _with(reward_gain=...), "register.min_gain", "reward_gain is missing from {file}: register.min_gain 0.05 fails closed"),
    ("gain-inf", _with(reward_gain=INF), "register.min_gain", "reward_gain is inf in {file}: register.min_gain 0.05 fails closed"),
    ("gain-low", _with(reward_gain=0.01), "register.min_gain", "reward_gain 0.0100 <= register.min_gain 0.05"),
    ("drift-nan", _with(drift_pixel_l1=NAN), "register.max_drift", "drift_pixel_l1 is NaN in {file}: register.max_drift 0.3 fails closed"),
    ("drift-null", _with(drift_pixel_l1=None), "register.max_drift", "drift_pixel_l1 is missing from {file}: register.max_drift 0.3 fails closed"),
    ("drift-text", _with(drift_pixel_l1="0.1"), "register.max_drift", "drift_pixel_l1 is '0.1' in {file}, not a number: register.max_drift 0.3 fails closed"),
    ("drift-high", _with(drift_pixel_l1=0.4), "register.max_drift", "drift_pixel_l1 0.4000 > register.max_drift 0.3"),
    ("gold-nan", _with(gold_policy=NAN), "register.max_gold_drop",
     "gold fid policy is NaN in {file} (gold.fid.policy): register.max_gold_drop 0.05 fails closed"),
    ("gold-missing", _with(gold_base=...), "register.max_gold_drop",
     "gold fid base is missing from {file} (gold.fid.base): register.max_gold_drop 0.05 fails closed"),
    ("gold-fell", _with(gold_policy=0.5), "register.max_gold_drop",
     "gold fid 0.9000 (base) -> 0.5000 (policy), drop +0.4000 > register.max_gold_drop 0.05"),
    ("primary-nan", _with(reward_mean=NAN), "register.primary_metric", "reward_mean is NaN in {file}: not comparable with a champion"),
])
def test_each_gate_fails_closed_and_a_refusal_names_only_it(decide, tmp_path, case, metrics, gate, says):
    d = decide(case, metrics)
    file = str(tmp_path / f"eval-{case}-1" / "metrics.json")
    assert not d["promoted"] and d["failed_gates"] == [gate]
    assert d["reason"] == says.format(file=file)  # nothing about the gates that passed (no "validation did not pass")
    assert d["gold_passed"] == (gate != "register.max_gold_drop")
    assert json.loads((Path(file).parent / "decision.json").read_text())["reason"] == d["reason"]


def test_all_gates_pass_promotes_and_refusals_name_every_failed_gate(decide, tmp_path):
    import mlflow

    d = decide("all", GOOD)
    assert d["promoted"] and d["failed_gates"] == [] and d["gold_passed"]
    assert d["reason"] == "no champion yet; gold fid 0.9000 (base) -> 0.8800 (policy), drop +0.0200 <= register.max_gold_drop 0.05"
    assert decide("off", _with(reward_gain=0.01, drift_pixel_l1=9.0, gold_policy=0.1), overrides=[])["promoted"]  # defaults: min_gain 0, no drift/gold gates

    d = decide("all", _with(reward_mean=0.61))  # better than the champion's 0.6, but not by more than the margin 0.0
    assert d["promoted"] and "improvement +0.0100 > register.margin 0.0" in d["reason"]
    d = decide("all", _with(reward_mean=0.605), overrides=[*GATES_ON, "register.margin=0.01"])
    assert not d["promoted"] and d["failed_gates"] == ["register.margin"]
    assert d["reason"] == "reward_mean 0.6050 vs champion v2 0.6100: improvement -0.0050 <= register.margin 0.01"

    d = decide("all", _with(reward_gain=NAN, drift_pixel_l1=0.5, reward_mean=0.5), reports=("ok", "failed"))
    assert not d["promoted"] and d["failed_gates"] == ["validation", "register.min_gain", "register.max_drift", "register.margin"]
    assert d["reason"].split("; ") == [f"validation failed: {tmp_path / 'failed.json'}",
                                       f"reward_gain is NaN in {tmp_path / 'eval-all-4' / 'metrics.json'}: register.min_gain 0.05 fails closed",
                                       "drift_pixel_l1 0.5000 > register.max_drift 0.3",
                                       "reward_mean 0.5000 vs champion v2 0.6100: improvement -0.1100 <= register.margin 0.0"]
    d = decide("all", _with(reward_mean=0.7), reports=("failed",))  # only the validation report failed
    assert d["failed_gates"] == ["validation"] and d["reason"] == f"validation failed: {tmp_path / 'failed.json'}"
    client = mlflow.MlflowClient()
    mv = client.get_model_version("pxpo-all", d["version"])
    assert mv.tags["validation"] == "failed" and mv.tags["pxpo.gate"] == f"not promoted: {d['reason']}"
    assert str(client.get_model_version_by_alias("pxpo-all", "champion").version) == "2"


def test_a_nan_threshold_in_the_config_passes_nothing(decide):
    d = decide("nan-limit", GOOD, overrides=[*GATES_ON, "register.max_drift=.nan"])
    assert not d["promoted"] and d["failed_gates"] == ["register.max_drift"]
    assert d["reason"] == "register.max_drift is nan, not a number: no drift_pixel_l1 passes it"


def test_register_policy_refuses_against_a_champion_without_a_comparable_metric(store, decide):
    """A champion whose metric is NaN (the alias moved there by hand): the challenger is not promoted, the margin gate says why."""
    import mlflow

    first = decide("champ", _with(reward_mean=NAN))
    assert not first["promoted"] and first["failed_gates"] == ["register.primary_metric"]
    assert math.isnan(first["challenger_metric"])
    mlflow.MlflowClient().set_registered_model_alias("pxpo-champ", "champion", first["version"])
    d = decide("champ", GOOD)
    assert not d["promoted"] and d["failed_gates"] == ["register.margin"]
    # MLflow's SQL store would read a NaN back from a logged model as 0.0: it is logged to the run only
    assert d["reason"] == "champion v1's reward_mean is missing from its logged model's metrics: not comparable; move the alias by hand"
    assert math.isnan(mlflow.MlflowClient().get_run(first["run_id"]).data.metrics["reward_mean"])
