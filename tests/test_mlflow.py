"""MLflow: tracker, gated registration with aliases, idempotence, loading the champion back; a real server."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

mlflow = pytest.importorskip("mlflow")

from pxpo.registry import load_registered_pipeline, log_policy_model, register_policy  # noqa: E402
from pxpo.tracking_mlflow import MlflowTracker, flatten, standard_tags  # noqa: E402


@pytest.fixture
def sqlite_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # default artifact root ./mlruns goes under tmp
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_tracker_logs_params_metrics_tags(sqlite_uri, tmp_path):
    t = MlflowTracker("exp", tracking_uri=sqlite_uri)
    with t.start(run_name="r"):
        t.log_params({"train": {"learning_rate": 1e-3, "epochs": 2}, "seed": 0})
        t.log_metrics({"reward_mean": 0.5, "note": "x"}, step=0)
        t.log_metrics({"reward_mean": 0.6}, step=1)
        t.set_tags(standard_tags(Path(__file__).resolve().parents[1]))
    run = mlflow.MlflowClient().get_run(t.run_id)
    assert run.data.params["train.learning_rate"] == "0.001"
    hist = mlflow.MlflowClient().get_metric_history(t.run_id, "reward_mean")
    assert [(m.step, m.value) for m in hist] == [(0, 0.5), (1, 0.6)]
    assert len(run.data.tags["git.commit"]) >= 7 and run.data.tags["pxpo.version"]


def _fake_policy(tiny_model_dir, out: Path, scale: float):
    from diffusers import UNet2DConditionModel

    from pxpo.models import add_lora, save_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    add_lora(unet, 4, 4.0)
    torch.manual_seed(int(scale * 100))
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, scale)
    save_lora(unet, out / "lora")
    return out


def test_register_gate_aliases_idempotent_and_load(sqlite_uri, tmp_path, tiny_model_dir):
    client = mlflow.MlflowClient()
    exp = client.create_experiment("reg")

    def reg(name, metric, passed=True, source=None):
        pol = _fake_policy(tiny_model_dir, tmp_path / name, 0.5)
        with mlflow.start_run(experiment_id=exp) as run:
            uri = log_policy_model(run.info.run_id, base_model=str(tiny_model_dir), policy_dir=pol, metrics={"reward_mean": metric})
        return register_policy(uri, "pxpo-test", metrics={"reward_mean": metric}, primary_metric="reward_mean", margin=0.01,
                               validations_passed=passed, source_hash=source or name)

    d1 = reg("a", 0.50)
    assert d1["promoted"] and d1["version"] == "1" and d1["reason"] == "no champion yet"
    d2 = reg("b", 0.505)  # better, but not by more than the margin
    assert not d2["promoted"] and d2["version"] == "2"
    assert str(client.get_model_version_by_alias("pxpo-test", "challenger").version) == "2"
    assert str(client.get_model_version_by_alias("pxpo-test", "champion").version) == "1"
    d3 = reg("c", 0.60, passed=False)  # much better, but a validation failed
    assert not d3["promoted"] and "validation" in d3["reason"]
    d4 = reg("d", 0.60)
    assert d4["promoted"] and str(client.get_model_version_by_alias("pxpo-test", "champion").version) == "4"
    again = reg("d2", 0.60, source="d")  # same source hash: no new version, same decision
    assert again["version"] == "4" and again["reused_version"] and again["promoted"]
    assert len(client.search_model_versions("name = 'pxpo-test'")) == 4
    assert all(mv.current_stage in (None, "None") for mv in client.search_model_versions("name = 'pxpo-test'"))

    pipe = load_registered_pipeline("models:/pxpo-test@champion")
    from diffusers import StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    base.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, height=16, width=16, output_type="pt")
    a = pipe("a handwritten digit 3", generator=torch.Generator().manual_seed(0), **kw).images
    b = base("a handwritten digit 3", generator=torch.Generator().manual_seed(0), **kw).images
    assert a.shape == (1, 3, 16, 16) and not torch.allclose(a, b)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("server")
    port = _free_port()
    exe = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{d / 'db.sqlite'}", "--artifacts-destination", str(d / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < 120:
        try:
            if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail("mlflow server did not answer /health within 120 s")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.mark.slow
def test_real_server(mlflow_server, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(mlflow_server)
    try:
        t = MlflowTracker("server-exp", tracking_uri=mlflow_server)
        with t.start(run_name="r"):
            t.log_metrics({"reward_mean": 0.7}, step=3)
            uri = log_policy_model(t.run_id, base_model=str(tiny_model_dir), policy_dir=_fake_policy(tiny_model_dir, tmp_path / "p", 0.3))
        d = register_policy(uri, "pxpo-server", metrics={"reward_mean": 0.7}, primary_metric="reward_mean", validations_passed=True, source_hash="s")
        assert d["promoted"]
        assert str(mlflow.MlflowClient().get_model_version_by_alias("pxpo-server", "champion").version) == "1"
    finally:
        mlflow.set_tracking_uri(None)
