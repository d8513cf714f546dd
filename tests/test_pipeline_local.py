"""`pxpo pipeline run --local`: the whole Kubeflow DAG on this machine with kfp.local, on the tiny model."""

import json
from pathlib import Path

import pytest
import yaml

from pxpo.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_local_pipeline_registers_a_champion(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = {
        "sample": {"batch_size": 4, "num_steps": 3},
        "train": {"batch_size": 2, "use_lora": True, "learning_rate": 1e-2, "clip_range": 0.1},
        "evaluate": {"samples_per_prompt": 2},
        "register": {"model_name": "pxpo-test", "min_gain": -1.0},
    }
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    code = main(
        ["pipeline", "run", "--local", "--params", str(pfile), "--rounds", "2", "--workdir", str(tmp_path / "w"),
         "--model-ref", str(tiny_model_dir), "--prompts-uri", str(ROOT / "data" / "prompts.csv")]
    )
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "is champion" in out
    root = tmp_path / "w" / "kfp_outputs"
    evals = list(root.rglob("evaluation/metrics.json"))
    assert evals and "reward_mean" in json.loads(evals[0].read_text())
    trains = sorted(root.rglob("policy/pxpo_round.json"))
    assert sorted(json.loads(p.read_text())["completed_rounds"] for p in trains) == [1, 2]

    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'w' / 'mlflow' / 'mlflow.db'}")
    client = MlflowClient()
    mv = client.get_model_version_by_alias("pxpo-test", "champion")
    assert str(mv.version) == "1"
    tags = client.get_run(mv.run_id).data.tags
    assert tags.get("kfp.run_id") and tags.get("kfp.run_name")  # from dsl.PIPELINE_JOB_ID / _NAME_PLACEHOLDER

    # Per-section params: a change to `register` only re-runs register; sampling and training come from the cache.
    params["register"]["margin"] = 100.0
    pfile.write_text(yaml.safe_dump(params))
    runs_before = set(root.iterdir())
    code = main(
        ["pipeline", "run", "--local", "--params", str(pfile), "--rounds", "2", "--workdir", str(tmp_path / "w"),
         "--model-ref", str(tiny_model_dir), "--prompts-uri", str(ROOT / "data" / "prompts.csv")]
    )
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    (second,) = set(root.iterdir()) - runs_before
    assert sorted(p.name for p in second.iterdir()) == ["register"]  # every other task was a cache hit
    assert str(client.get_model_version_by_alias("pxpo-test", "champion").version) == "1"  # margin 100: not promoted
