"""Training you can watch: ``pxpo run`` logs to MLflow while it trains, and the register step uploads the
loop's images as image series. Checked through ``MlflowClient`` on a SQLite store, as the MLflow UI reads it."""

import json
import re

import pytest

import prereq
mlflow = prereq.import_module("mlflow", "pinned in requirements-lock.txt (bash scripts/setup.sh)")

from pxpo.config import load_config  # noqa: E402
from pxpo.tracking import image_steps  # noqa: E402

FAST = ["sample.batch_size=4", "sample.num_steps=3", "train.batch_size=2", "train.save_every=1", "train.learning_rate=1e-2",
        "train.clip_range=0.1", "train.use_lora=true", "train.probe_every=1", "train.probe_samples=2", "register.experiment=live"]
# MLflow 3's time-stepped images (MlflowClient.log_image(key=, step=)): images/<key>+step+<step>+timestamp+<ms>+<uuid>.png,
# a +compressed.webp thumbnail beside it, and the run tag mlflow.loggedImages (what the UI's image view lists)
STEP_IMAGE = re.compile(r"images/(?P<key>[^+]+)\+step\+(?P<step>\d+)\+timestamp\+\d+\+[0-9a-f-]+\.png$")


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # a stray ./mlruns would show here
    uri = f"sqlite:///{tmp_path / 'store' / 'mlruns.db'}"
    (tmp_path / "store").mkdir()
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def image_series(client, run_id: str) -> dict[str, list[int]]:
    """{key: sorted steps} of a run's time-stepped images, read from its artifacts."""
    out: dict[str, list[int]] = {}
    for a in client.list_artifacts(run_id, "images"):
        if m := STEP_IMAGE.fullmatch(a.path):
            out.setdefault(m["key"], []).append(int(m["step"]))
    return {k: sorted(v) for k, v in out.items()}


def test_run_logs_images_live_and_register_uploads_them(store, tmp_path, tiny_model_dir):
    from pxpo.mlflow.promotion import gate_and_register
    from pxpo.stages.online import run_online

    out = tmp_path / "r"
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"output_dir={out}", "train.epochs=3", *FAST])
    run_online(cfg, progress=False, tracking_uri=store, stop_after_epochs=2)  # "killed" after epoch 1
    first = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    run_online(cfg, progress=False, tracking_uri=store)  # resumes the run directory and the MLflow run

    client = mlflow.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("live").experiment_id])
    assert [r.info.run_id for r in runs] == [first]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["pxpo.stage"] == "run" and run.data.tags["pxpo.resumed_at_epoch"] == "2"
    assert run.data.tags["mlflow.loggedImages"].lower() == "true"
    assert run.data.params["train.probe_every"] == "1"
    assert [m.step for m in client.get_metric_history(first, "reward_mean")] == [0, 1, 2]
    assert [m.step for m in client.get_metric_history(first, "probe_drift_pixel_l1")] == [0, 1, 2]
    assert image_series(client, first) == {"probe_samples": [0, 1, 2], "reward_map_mean": [0, 1, 2]}
    assert {a.path for a in client.list_artifacts(first)} >= {"reward_curve.png", "summary.json"}
    # the run directory holds the same images (the register step uploads these)
    assert {k: [s for s, _ in v] for k, v in image_steps(out).items()} == {"probe_samples": [0, 1, 2], "reward_map_mean": [0, 1, 2]}

    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "metrics.json").write_text(json.dumps({"reward_mean": 0.5, "reward_gain": 0.1}))
    (tmp_path / "ok.json").write_text('{"success": true}')
    decision = gate_and_register(cfg, policy_dir=out, eval_dir=ev, tracking_uri=store, validation_reports=[tmp_path / "ok.json"], out=None)
    reg = decision["run_id"]
    assert image_series(client, reg) == {"train.probe_samples": [0, 1, 2], "train.reward_map_mean": [0, 1, 2]}
    assert [m.step for m in client.get_metric_history(reg, "train.reward_mean")] == [0, 1, 2]
