"""MLflow (``pxpo.mlflow``): tracker, pyfunc policy model (params schema), gated registration with
aliases, metrics on the logged model, idempotence, the register stage's run (git tag, dataset
inputs), loading the champion back (in process and in a fresh one); a real ``mlflow server``."""

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from servers import free_port, stop
import torch

import prereq
mlflow = prereq.import_module("mlflow", "pinned in requirements-lock.txt (bash scripts/setup.sh)")

from pxpo.mlflow.model_registry import (  # noqa: E402
    find_version,
    load_registered_pipeline,
    log_policy_model,
    logged_model_id,
    register_policy,
    version_metrics,
)
from pxpo.mlflow.pyfunc import decode_image  # noqa: E402
from pxpo.mlflow.tracking import (  # noqa: E402
    MlflowTracker,
    clean_key,
    default_tracking_uri,
    ensure_experiment,
    flatten,
    standard_tags,
)

REPO = Path(__file__).resolve().parents[1]
GEN = dict(num_inference_steps=3, height=16, width=16, output_type="pt")


@pytest.fixture(scope="module")
def template_db(mlflow_template_db):
    """An empty, fully migrated SQLite store (tests/conftest.py, built once per session). Creating one runs
    MLflow's alembic migrations (~7 s); every test (and the server) starts from a copy instead (~0.05 s)."""
    return mlflow_template_db


@pytest.fixture
def store(tmp_path, monkeypatch, template_db):
    """A SQLite store under tmp_path/store; cwd is tmp_path so stray ./mlruns writes would show."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "store").mkdir()
    shutil.copyfile(template_db, tmp_path / "store" / "mlruns.db")
    uri = default_tracking_uri(tmp_path / "store")
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


# ----- tracking ------------------------------------------------------------------


def test_import_does_not_import_mlflow():
    code = ("import sys, pxpo.mlflow, pxpo.mlflow.tracking, pxpo.mlflow.datasets, pxpo.mlflow.promotion, pxpo.mlflow.model_registry\n"
            "assert 'mlflow' not in sys.modules, 'mlflow imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_flatten_and_keys():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3, "f": {}}) == {"a.b": 1, "a.c.d": 2, "e": 3, "f": {}}
    assert clean_key("reward@mean (x)") == "reward_mean _x_"
    assert clean_key("train/lr:0") == "train/lr:0"
    assert clean_key("/a//b") == "a__b"
    assert len(clean_key("k" * 400)) == 250


def test_default_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert default_tracking_uri(tmp_path) == "http://mlflow.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    uri = default_tracking_uri(Path("rel"))
    assert uri == f"sqlite:///{(tmp_path / 'rel' / 'mlruns.db').resolve()}" and uri.startswith("sqlite:////")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "mlflow.db").touch()  # a store an earlier pxpo created is kept
    assert default_tracking_uri(tmp_path / "old").endswith("/old/mlflow.db")


def test_standard_tags(tmp_path, monkeypatch):
    monkeypatch.delenv("KFP_RUN_ID", raising=False)
    tags = standard_tags(REPO)
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["pxpo.version"] and "kfp.run_id" not in tags
    assert tags["mlflow.source.git.dirty"] in ("true", "false")
    lock = (
        "schema: '2.0'\nstages:\n  prepare:\n    cmd: pxpo prepare\n    outs:\n"
        "    - path: data/prepared\n      hash: md5\n      md5: 0123abcd.dir\n      size: 10\n"
        "  base:\n    cmd: pxpo base build\n    outs:\n    - path: models/base\n      md5: 4567ef\n"
    )
    (tmp_path / "dvc.lock").write_text(lock)
    monkeypatch.setenv("KFP_RUN_ID", "run-123")
    tags = standard_tags(tmp_path)  # not a git checkout
    assert "mlflow.source.git.commit" not in tags and tags["kfp.run_id"] == "run-123"
    assert tags["dvc.data"] == "data/prepared=0123abcd.dir;models/base=4567ef"
    assert len(tags["dvc.lock.sha256"]) == 64


def test_tracker_params_metrics_tags_images(store, tmp_path):
    client = mlflow.MlflowClient()
    t = MlflowTracker("exp", tracking_uri=store)
    with t.start(run_name="parent", tags={"start.big": "y" * 9000}) as tr:
        parent = tr.run_id
        tr.log_params({"train": {"learning_rate": 1e-3, "epochs": 2, "clip": None}, "seed": 0, "long": "v" * 7000,
                       "many": {f"p{i}": i for i in range(150)}})
        tr.log_params({"seed": 0})  # identical value: no-op
        with pytest.warns(UserWarning, match="immutable"):
            tr.log_params({"seed": 1})  # changed value: kept as a tag
        tr.log_metrics({"reward_mean": 0.5, "note": "x", "np": np.float32(0.25), "t": torch.tensor(2.0), "nested": {"a": 1}}, step=0)
        tr.log_metrics({"reward_mean": 0.6}, step=1)
        tr.set_tags({"pxpo.stage": "test", "big": "x" * 9000})
        png = tmp_path / "g.png"
        from PIL import Image

        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(png)
        tr.log_image(png, "grid.png")
        tr.log_image(torch.rand(3, 8, 8), "reward_map")  # CHW float tensor
        tr.log_image(np.zeros((8, 8), np.uint8), "series", step=2)
        tr.log_artifact(png)
        child = MlflowTracker("exp").start(run_name="child", parent_run_id=parent)
        child.log_metrics({"x": 1.0}, step=0)
        child_id = child.run_id
        child.end()
        assert child.run_id == child_id  # the last run's id stays readable after end()
    with pytest.raises(ValueError):
        with MlflowTracker("exp").start(run_name="boom"):
            raise ValueError("boom")

    run = client.get_run(parent)
    p = run.data.params
    assert p["train.learning_rate"] == "0.001" and p["train.epochs"] == "2" and p["train.clip"] == "None"
    assert len(p["long"]) == 6000 and p["many.p149"] == "149" and len(p) == 155
    assert [(m.step, m.value) for m in client.get_metric_history(parent, "reward_mean")] == [(0, 0.5), (1, 0.6)]
    assert run.data.metrics["np"] == 0.25 and run.data.metrics["t"] == 2.0 and run.data.metrics["nested.a"] == 1.0
    assert "note" not in run.data.metrics
    # MLflow's log_batch truncates long values (no hand-written truncation in pxpo)
    assert run.data.tags["pxpo.stage"] == "test" and len(run.data.tags["big"]) == 8000 and len(run.data.tags["start.big"]) == 8000
    assert p["seed"] == "0" and run.data.tags["pxpo.param_changed.seed"] == "1"
    assert run.info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(parent, "images")}
    assert {"images/grid.png", "images/reward_map.png"} <= names
    assert client.get_run(child_id).info.status == "FINISHED"
    kids = client.search_runs([t.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert [k.info.run_name for k in kids] == ["child"]
    failed = client.search_runs([t.experiment_id], "attributes.run_name = 'boom'")
    assert failed[0].info.status == "FAILED"
    # artifacts beside the database, nothing under ./mlruns of the working directory
    assert run.info.artifact_uri.startswith((tmp_path / "store" / "mlartifacts").as_uri())
    assert (tmp_path / "store" / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()


# ----- registry ----------------------------------------------------------------


def _fake_policy(tiny_model_dir, out: Path, seed: int, full_unet: bool = False):
    """A 'trained' policy: a LoRA on the tiny UNet with random lora_B, or a perturbed full UNet."""
    from diffusers import UNet2DConditionModel

    from pxpo.models import add_lora, save_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    g = torch.Generator().manual_seed(seed)
    if full_unet:
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        unet.save_pretrained(out / "model" / "unet")
        return out
    add_lora(unet, 4, 4.0)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    save_lora(unet, out / "lora")
    return out


def _base_images(tiny_model_dir):
    """The base pipeline's output (same loader, scheduler and seed as the registered one)."""
    from pxpo.models import load_pipeline

    base = load_pipeline(str(tiny_model_dir))
    return base("a handwritten digit 3", generator=torch.Generator().manual_seed(0), **GEN).images


def test_register_gate_aliases_idempotent_and_load(store, tmp_path, tiny_model_dir):
    client = mlflow.MlflowClient()
    exp = ensure_experiment("reg")
    timings = {"log": [], "register": []}

    def reg(tag, metric, passed=True, source=None, full_unet=False, include_base=None, name="pxpo-test"):
        pol = _fake_policy(tiny_model_dir, tmp_path / tag, seed=len(tag) + int(metric * 1000), full_unet=full_unet)
        with mlflow.start_run(experiment_id=exp):
            t0 = time.perf_counter()
            uri = log_policy_model(None, base_model=str(tiny_model_dir), policy_dir=pol, include_base=include_base,
                                   metrics={"reward_mean": metric}, num_steps=3)
            timings["log"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        d = register_policy(uri, name, metrics={"reward_mean": metric}, primary_metric="reward_mean", margin=0.01,
                            validations_passed=passed, source_hash=source or tag)
        timings["register"].append(time.perf_counter() - t0)
        return d

    def alias(a, name="pxpo-test"):
        v = client.get_registered_model(name).aliases.get(a)
        return None if v is None else str(v)

    d = reg("fail0", 0.9, passed=False)  # failed validation never promotes, even with no champion
    assert (d["version"], d["promoted"], alias("champion"), alias("challenger")) == ("1", False, None, "1")
    d = reg("a", 0.50)
    assert d["promoted"] and d["version"] == "2" and d["reason"] == "no champion yet" and alias("champion") == "2"
    d = reg("b", 0.505)  # better, but not by more than the margin
    assert not d["promoted"] and (alias("challenger"), alias("champion")) == ("3", "2")
    assert d["champion_version"] == "2" and d["champion_metric"] == 0.5 and d["challenger_metric"] == 0.505
    d = reg("c", 0.70, passed=False, full_unet=True, include_base=False)  # much better, validation failed
    assert not d["promoted"] and "validation" in d["reason"] and alias("champion") == "2"
    d5 = reg("d", 0.60)
    assert d5["promoted"] and d5["previous_champion_version"] == "2" and alias("champion") == "5"
    again = reg("d-rerun", 0.60, source="d")  # same source hash: no new version, same decision
    assert again["reused_version"] and (again["version"], again["promoted"], again["champion_version"]) == ("5", True, "5")
    old = reg("a-rerun", 0.50, source="a")  # the old champion re-run: reused, no longer promoted
    assert old["reused_version"] and old["version"] == "2" and not old["promoted"] and alias("champion") == "5"
    assert find_version("pxpo-test", "d") == "5" and find_version("pxpo-test", "nope") is None
    versions = client.search_model_versions("name = 'pxpo-test'")
    assert len(versions) == 5 and all(mv.current_stage in (None, "None") for mv in versions)
    mv5 = client.get_model_version("pxpo-test", "5")
    assert mv5.tags["pxpo.source_hash"] == "d" and mv5.tags["validation"] == "passed"
    assert client.get_model_version("pxpo-test", "4").tags["validation"] == "failed"
    # the metrics live on the logged model (MLflow 3), not in metric.* version tags
    assert not any(k.startswith("metric.") for k in mv5.tags)
    model_id = logged_model_id("models:/pxpo-test/5")
    assert model_id.startswith("m-") and logged_model_id("models:/pxpo-test@champion") == model_id
    lm = mlflow.get_logged_model(model_id)
    assert [(m.key, m.value, m.model_id) for m in lm.metrics] == [("reward_mean", 0.6, model_id)]
    assert version_metrics(client, mv5) == {"reward_mean": 0.6} and lm.source_run_id == mv5.run_id
    assert client.get_run(mv5.run_id).data.metrics["reward_mean"] == 0.6  # on the run as well

    # lower is better: a second registered model from existing versions; the champion's
    # value is read through its source (models:/pxpo-test/N) from the logged model
    def low(v, margin=0.05):
        m = version_metrics(client, client.get_model_version("pxpo-test", v))
        return register_policy(f"models:/pxpo-test/{v}", "pxpo-low", metrics=m, primary_metric="reward_mean",
                               higher_is_better=False, margin=margin, validations_passed=True, source_hash=f"low{v}")

    assert low("5")["promoted"]  # 0.6, no champion
    d = low("3")  # 0.505: lower by 0.095 > 0.05
    assert d["promoted"] and d["previous_champion_metric"] == 0.6
    d = low("2")  # 0.50: lower by only 0.005
    assert not d["promoted"] and d["champion_version"] == "2" and d["champion_metric"] == 0.505

    # the champion back as a diffusers pipeline: the LoRA changes the output
    base = _base_images(tiny_model_dir)
    pipe = load_registered_pipeline("models:/pxpo-test@champion")
    a = pipe("a handwritten digit 3", generator=torch.Generator().manual_seed(0), **GEN).images
    assert a.shape == (1, 3, 16, 16) and torch.isfinite(a).all() and not torch.allclose(a, base, atol=1e-4)
    # a full-UNet version whose base is a reference only (not copied into the model)
    info = mlflow.models.get_model_info("models:/pxpo-test/4")
    assert set(info.flavors["python_function"]["artifacts"]) == {"policy"} and info.metadata["policy_kind"] == "unet"
    assert info.metadata["base_included"] is False and info.metadata["base_model"] == str(Path(tiny_model_dir).resolve())
    u = load_registered_pipeline("models:/pxpo-test/4")("a handwritten digit 3", generator=torch.Generator().manual_seed(0), **GEN).images
    assert not torch.allclose(u, base, atol=1e-4)

    # pyfunc predict honours params (ParamSchema), defaults = the logged sampling settings
    import pandas as pd

    m = mlflow.pyfunc.load_model("models:/pxpo-test@champion", model_config={"device": "cpu"})
    specs = {p.name: (p.dtype.name, p.default) for p in m.metadata.get_params_schema().params}
    assert specs == {"steps": ("long", 3), "guidance": ("double", 3.0), "seed": ("long", 0), "negative_prompt": ("string", "")}
    df = pd.DataFrame({"prompt": ["a handwritten digit 3"]})

    def img(frame=df, **params):
        return np.asarray(decode_image(m.predict(frame, params=params or None)["image"][0]), dtype=np.int16)

    s2, s4, default = img(steps=2), img(steps=4), img()
    assert s2.shape == (16, 16, 3) and np.array_equal(s2, img(steps=2))
    assert not np.array_equal(s2, s4) and np.array_equal(default, img(steps=3))  # default: the logged 3 steps
    assert not np.array_equal(img(seed=1), default)
    assert not np.array_equal(img(negative_prompt="a handwritten digit 8"), default)
    assert not np.array_equal(img(guidance=1.0), default)
    # a per-row column wins over the param
    assert np.array_equal(img(df.assign(num_inference_steps=[2]), steps=4), s2)

    print(f"\nlog_policy_model: {', '.join(f'{t:.2f}' for t in timings['log'])} s; "
          f"register_policy: {', '.join(f'{t:.2f}' for t in timings['register'])} s")


def test_champion_predicts_in_a_fresh_process(store, tmp_path, tiny_model_dir):
    """pyfunc.load_model + predict in a new interpreter; pxpo comes from the code bundled in the model."""
    with mlflow.start_run(experiment_id=ensure_experiment("fresh")) as run:
        uri = log_policy_model(run.info.run_id, base_model=str(tiny_model_dir), policy_dir=_fake_policy(tiny_model_dir, tmp_path / "p", 7))
    register_policy(uri, "pxpo-fresh", metrics={"r": 1.0}, primary_metric="r", margin=0.0, validations_passed=True, source_hash="f")
    code = (
        "import json, pandas as pd, mlflow\n"
        "m = mlflow.pyfunc.load_model('models:/pxpo-fresh@champion', model_config={'device': 'cpu'})\n"
        "df = pd.DataFrame({'prompt': ['a handwritten digit 3', 'a handwritten digit 5'], 'seed': [1, 2], 'num_inference_steps': [2, 2]})\n"
        "out = m.predict(df)\n"
        "import pxpo\n"
        "print(json.dumps({'images': out['image'].tolist(), 'columns': list(out.columns), 'pxpo': pxpo.__file__}))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    from PIL import Image

    imgs = [Image.open(io.BytesIO(base64.b64decode(s))) for s in res["images"]]
    assert res["columns"] == ["image"] and [im.size for im in imgs] == [(16, 16), (16, 16)]
    assert Path(res["pxpo"]).parent.parent.name == "code"  # the bundled copy, not the checkout


def test_log_policy_model_rejects_bad_input(store, tmp_path, tiny_model_dir):
    from pxpo.errors import PxpoInputError

    (tmp_path / "empty").mkdir()
    with mlflow.start_run(experiment_id=ensure_experiment("bad")):
        with pytest.raises(PxpoInputError, match="no policy"):
            log_policy_model(None, base_model=str(tiny_model_dir), policy_dir=tmp_path / "empty")
        pol = _fake_policy(tiny_model_dir, tmp_path / "p", 1)
        with pytest.raises(PxpoInputError, match="include_base"):
            log_policy_model(None, base_model="org/some-model", policy_dir=pol, include_base=True)
    with pytest.raises(PxpoInputError, match="primary_metric"):
        register_policy("models:/x/1", "x", metrics={"a": 1.0}, primary_metric="b", validations_passed=True, source_hash="s")


def test_version_metrics_fallbacks():
    """Versions registered by older pxpo: ``metric.*`` version tags, then the source run's metrics."""
    from types import SimpleNamespace

    class Client:
        def get_run(self, run_id):
            return SimpleNamespace(data=SimpleNamespace(metrics={"reward_mean": 0.3}))

    old = SimpleNamespace(model_id=None, source="runs:/abc/policy", run_id="abc", tags={"metric.reward_mean": "0.4", "validation": "passed"})
    assert version_metrics(Client(), old) == {"reward_mean": 0.4}
    older = SimpleNamespace(model_id=None, source="/some/path", run_id="abc", tags={})
    assert version_metrics(Client(), older) == {"reward_mean": 0.3}
    assert logged_model_id("runs:/abc/policy") is None and logged_model_id("models:/m-0123") == "m-0123"


def _git_checkout(d: Path) -> str:
    d.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(cmd, cwd=d, env=env, check=True, capture_output=True, timeout=30)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=d, capture_output=True, text=True, check=True).stdout.strip()


def test_gate_and_register_run(store, tmp_path, tiny_model_dir, monkeypatch):
    """The register stage's run: git source tag, prompt dataset inputs, metrics on the logged model, the gate."""
    from pxpo.config import load_config
    from pxpo.mlflow.promotion import gate_and_register

    commit = _git_checkout(tmp_path / "checkout")
    monkeypatch.chdir(tmp_path / "checkout")
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "train.jsonl").write_text("".join(json.dumps({"prompt": f"a handwritten digit {d}", "weight": 1.0}) + "\n" for d in range(8)))
    (prepared / "heldout.jsonl").write_text("".join(json.dumps({"prompt": f"a handwritten digit {d}", "weight": 1.0}) + "\n" for d in (8, 9)))
    (prepared / "dataset.json").write_text(json.dumps({"version": "ab" * 32}))
    report = tmp_path / "ok.json"
    report.write_text('{"success": true}')
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "sample.num_steps=3", "register.model_name=pxpo-gate",
                             "register.experiment=gate", "register.margin=0.01", f"prompts.source={prepared}"])

    def gate(tag, reward, seed):
        ev = tmp_path / f"eval-{tag}"
        ev.mkdir(exist_ok=True)
        (ev / "metrics.json").write_text(json.dumps({"reward_mean": reward, "reward_gain": 0.1, "num_samples": 4}))
        pol = tmp_path / f"pol-{seed}"
        if not pol.exists():
            _fake_policy(tiny_model_dir, pol, seed)
        return gate_and_register(cfg, policy_dir=pol, eval_dir=ev, tracking_uri=store, validation_reports=[report], out=None)

    d1 = gate("a", 0.5, 1)
    assert d1["promoted"] and d1["version"] == "1"
    client = mlflow.MlflowClient()
    run = client.get_run(d1["run_id"])
    assert run.data.tags["mlflow.source.git.commit"] == commit and run.data.tags["pxpo.stage"] == "register"
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"prepared-train", "prepared-heldout"}
    ctx = {n: {t.key: t.value for t in i.tags}["mlflow.data.context"] for n, i in inputs.items()}
    assert ctx == {"prepared-train": "training", "prepared-heldout": "evaluation"}
    assert inputs["prepared-train"].dataset.digest == "abababababab-train"
    assert json.loads(inputs["prepared-train"].dataset.profile)["num_rows"] == 8
    lm = mlflow.get_logged_model(logged_model_id(d1["model_uri"]))
    assert {m.key: m.value for m in lm.metrics} == {"reward_mean": 0.5, "reward_gain": 0.1, "num_samples": 4.0}
    assert run.data.metrics["reward_mean"] == 0.5
    assert len(client.get_metric_history(run.info.run_id, "reward_mean")) == 1  # logged once (run + model)

    assert gate("a", 0.5, 1)["reused_version"]  # same policy and evaluation: same version
    d3 = gate("b", 0.505, 2)  # the champion's 0.5 read back from its logged model
    assert not d3["promoted"] and d3["previous_champion_metric"] == 0.5 and d3["version"] == "2"
    assert gate("c", 0.7, 3)["promoted"]
    assert str(client.get_model_version_by_alias("pxpo-gate", "champion").version) == "3"


def test_register_refuses_promotion_beyond_max_drift(store, tmp_path, tiny_model_dir, monkeypatch):
    """register.max_drift: a policy that drifted further from the base than allowed is not promoted."""
    from pxpo.config import load_config
    from pxpo.errors import PxpoInputError
    from pxpo.mlflow.promotion import gate_and_register

    monkeypatch.chdir(tmp_path)
    report = tmp_path / "ok.json"
    report.write_text('{"success": true}')
    pol = tmp_path / "pol"
    _fake_policy(tiny_model_dir, pol, 7)

    def gate(name, drift, max_drift):
        ev = tmp_path / f"eval-{name}"
        ev.mkdir(exist_ok=True)
        m = {"reward_mean": 0.6, "reward_gain": 0.2, "num_samples": 4}
        if drift is not None:
            m["drift_pixel_l1"] = drift
        (ev / "metrics.json").write_text(json.dumps(m))
        over = [f"register.max_drift={max_drift}"] if max_drift is not None else []
        cfg = load_config(None, [f"model.path={tiny_model_dir}", f"register.model_name=pxpo-drift-{name}", "register.experiment=drift", *over])
        return gate_and_register(cfg, policy_dir=pol, eval_dir=ev, tracking_uri=store, validation_reports=[report], out=None)

    d = gate("far", 0.4, 0.3)
    assert not d["promoted"] and "drift_pixel_l1 0.4000 > register.max_drift 0.3" in d["reason"]
    assert gate("near", 0.2, 0.3)["promoted"]
    assert gate("off", 0.9, None)["promoted"]  # default: no drift gate
    with pytest.raises(PxpoInputError, match="drift_pixel_l1"):
        gate("missing", None, 0.3)


# ----- a real tracking server --------------------------------------------------------


_free_port, _stop = free_port, stop  # tests/servers.py


SERVER_TEST = "test_real_server"
SERVER_WAIT_S = 120


def _poll_health(url: str, proc, state: dict) -> None:
    """GET /health every second until 200, the process exits or SERVER_WAIT_S pass."""
    while time.time() - state["t0"] < SERVER_WAIT_S and proc.poll() is None:
        try:
            if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                state["ready_s"] = time.time() - state["t0"]
                break
        except OSError:
            pass
        time.sleep(1)
    state["done"].set()


@pytest.fixture(scope="module", autouse=True)
def _server_process(request, tmp_path_factory, template_db):
    """Start ``mlflow server`` in the background when this module starts, so its start-up
    overlaps the other tests; only when the server test is selected."""
    if not any(item.name == SERVER_TEST for item in request.session.items):
        yield None
        return
    d = tmp_path_factory.mktemp("server")
    shutil.copyfile(template_db, d / "db.sqlite")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no huey job runner processes (faster start and stop)
    log = open(d / "server.log", "wb")
    state = {"t0": time.time(), "done": threading.Event(), "ready_s": None, "log": d / "server.log", "url": f"http://127.0.0.1:{port}"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{d / 'db.sqlite'}", "--artifacts-destination", str(d / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=d, env=env,
    )
    state["proc"] = proc
    threading.Thread(target=_poll_health, args=(state["url"], proc, state), daemon=True).start()
    try:
        yield state
    finally:
        _stop(proc)
        log.close()


@pytest.fixture
def mlflow_server(_server_process):
    """The server's URL once it answers GET /health (polled every second, up to 120 s)."""
    s = _server_process
    s["done"].wait(SERVER_WAIT_S + 5)
    if s["ready_s"] is None:
        rc = s["proc"].poll()
        why = f"exited with {rc}" if rc is not None else f"did not answer /health within {SERVER_WAIT_S} s"
        pytest.fail(f"mlflow server {why}:\n{s['log'].read_text()[-3000:]}")
    print(f"\nmlflow server answered /health {s['ready_s']:.1f} s after it was started")
    return s["url"]


@pytest.mark.slow
def test_real_server(mlflow_server, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    try:
        with MlflowTracker("server-exp", tracking_uri=mlflow_server).start(run_name="r") as t:
            t.set_tags(standard_tags(REPO))
            t.log_params({"train": {"learning_rate": 3e-4}, "long": "v" * 7000})
            t.log_metrics({"reward_mean": 0.7}, step=3)
            uri = log_policy_model(t.run_id, base_model=str(tiny_model_dir), policy_dir=_fake_policy(tiny_model_dir, tmp_path / "p", 3),
                                   metrics={"reward_mean": 0.7})
        kw = dict(metrics={"reward_mean": 0.7}, primary_metric="reward_mean", validations_passed=True, source_hash="s")
        d1 = register_policy(uri, "pxpo-server", **kw)
        d2 = register_policy(uri, "pxpo-server", **kw)
        assert d1["promoted"] and d2["reused_version"] and d1["version"] == d2["version"] == "1"
        client = mlflow.MlflowClient(mlflow_server)
        assert str(client.get_model_version_by_alias("pxpo-server", "champion").version) == "1"
        assert client.get_registered_model("pxpo-server").aliases == {"champion": "1", "challenger": "1"}
        assert version_metrics(client, client.get_model_version("pxpo-server", "1")) == {"reward_mean": 0.7}
        run = client.get_run(t.run_id)
        assert len(run.data.params["long"]) == 6000 and "mlflow.source.git.commit" in run.data.tags  # the server truncates
        pipe = load_registered_pipeline("models:/pxpo-server@champion")
        img = pipe("a handwritten digit 3", generator=torch.Generator().manual_seed(0), **GEN).images
        assert img.shape == (1, 3, 16, 16)
    finally:
        mlflow.set_tracking_uri(None)
