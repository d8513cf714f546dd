"""`pxpo pipeline run --local`: the whole Kubeflow DAG on this machine with kfp.local, on the tiny model.

The default pipeline and the region-level preference pipeline (issue 24) run in one workdir, as a team's
runs would: the second pipeline's base-model and prepare tasks (the same model and prompts) come from the
first one's kfp.local cache.
"""

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from pxpo.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One ``--workdir`` (kfp.local cache, outputs, MLflow store) for this file's pipeline runs."""
    return tmp_path_factory.mktemp("kfp") / "w"


@pytest.mark.slow
def test_local_pipeline_registers_a_champion(tmp_path, workdir, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # issue 22: a team's own reward function by `module:function`, outside pxpo, through every kfp.local task
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "team_rewards.py").write_text(
        "def contrast(**kwargs):\n"
        "    def fn(images, prompts):\n"
        "        lum = images.float().mean(1)\n"
        "        return ((lum - 0.5).abs() * 2).clamp(0, 1), {}\n"
        "    return fn\n"
    )
    monkeypatch.setenv("PYTHONPATH", f"{plugins}:{__import__('os').environ.get('PYTHONPATH', '')}".rstrip(":"))
    params = {
        "sample": {"batch_size": 4, "num_steps": 3},
        "train": {"batch_size": 2, "use_lora": True, "learning_rate": 1e-2, "clip_range": 0.1, "kl_coef": 0.5,
                  "probe_every": 1, "probe_samples": 2},  # the loop's images every epoch (issue 23: training you can watch)
        # two reward components and a gold reward: all of issue 16's signals must reach MLflow and the KFP metrics
        "reward": {"components": [{"name": "brightness_target", "kwargs": {"layout": "left_bright"}, "label": "left"},
                                  {"name": "team_rewards:contrast", "weight": 0.5, "label": "contrast"}]},
        "evaluate": {"samples_per_prompt": 2, "gold": [{"name": "digit_fidelity", "kwargs": {"score": "correct"}}]},
        "register": {"model_name": "pxpo-test", "min_gain": -1.0},
    }
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    code = main(
        ["pipeline", "run", "--local", "--params", str(pfile), "--rounds", "2", "--workdir", str(workdir),
         "--model-ref", str(tiny_model_dir), "--prompts-uri", str(ROOT / "data" / "prompts.csv")]
    )
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "v1 PROMOTED to champion" in out
    summary = out.strip().splitlines()[-1]  # the trained reward, the held-out reward and the gold reward of base and policy
    assert summary.startswith("  trained reward ") and "held-out " in summary and "gold digit_fidelity " in summary, out
    # one line per task, no executor input or params on the terminal; full logs in files named in the output
    lines = out.strip().splitlines()
    assert len(lines) < 20, out
    assert "executor_input" not in out and "params_train" not in out and "torchvision" not in out
    task_lines = [ln for ln in lines if ln.startswith("[")]
    assert len(task_lines) == 10 and all(" SUCCESS " in ln for ln in task_lines), out  # base-model, prepare, 2 x (sample, label, train), evaluate, register
    assert any("held-out reward" in ln for ln in task_lines) and any("registered pxpo-test v1" in ln for ln in task_lines)
    assert any(" train " in ln and "trained 1 round(s) to epoch 1" in ln for ln in task_lines), out
    log_dir = Path(out.split("each task's full log: ", 1)[1].split("/<task>.log", 1)[0])
    full = (log_dir / "pipeline.log").read_text()
    assert "Got executor_input" in full and "params_train" in full  # the full logs are in the files
    assert len(list(log_dir.glob("*.log"))) == 11  # 10 tasks + pipeline.log
    root = workdir / "kfp_outputs"
    evals = list(root.rglob("evaluation/metrics.json"))
    assert evals and "reward_mean" in json.loads(evals[0].read_text())
    trains = sorted(root.rglob("policy/pxpo_round.json"))
    assert sorted(json.loads(p.read_text())["completed_rounds"] for p in trains) == [1, 2]

    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}")
    client = MlflowClient()
    mv = client.get_model_version_by_alias("pxpo-test", "champion")
    assert str(mv.version) == "1"
    run = client.get_run(mv.run_id)
    logged = set(run.data.metrics)
    for key in ("train.kl_ref", "train.ratio_dev_max", "train.reward_left", "train.reward_contrast",
                "gold_digit_fidelity", "base_gold_digit_fidelity", "reward_left", "base_reward_left", "reward_contrast"):
        assert key in logged, (key, sorted(logged))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train.kl_ref")] == [0, 1]  # both rounds' epochs
    # both rounds' images as image series at their epochs (round 1's output carries round 0's images)
    steps = {}
    for a in client.list_artifacts(run.info.run_id, "images"):
        if "+step+" in a.path and a.path.endswith(".png"):
            key, _, step = a.path[len("images/"):].split("+")[:3]
            steps.setdefault(key, []).append(int(step))
    assert {k: sorted(v) for k, v in steps.items()} == {"train.probe_samples": [0, 1], "train.reward_map_mean": [0, 1]}, steps
    (kfp_eval,) = root.rglob("evaluate/metrics")  # the evaluate task's KFP Metrics artifact
    assert {"gold_digit_fidelity", "base_gold_digit_fidelity", "reward_left", "reward_contrast"} <= set(json.loads(kfp_eval.read_text()))
    tags = run.data.tags
    assert tags.get("kfp.run_id") and tags.get("kfp.run_name")  # from dsl.PIPELINE_JOB_ID / _NAME_PLACEHOLDER

    # Per-section params: a change to `register` only re-runs register; sampling and training come from the cache.
    params["register"]["margin"] = 100.0
    pfile.write_text(yaml.safe_dump(params))
    runs_before = set(root.iterdir())
    code = main(
        ["pipeline", "run", "--local", "--params", str(pfile), "--rounds", "2", "--workdir", str(workdir),
         "--model-ref", str(tiny_model_dir), "--prompts-uri", str(ROOT / "data" / "prompts.csv")]
    )
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert sum(" CACHED " in ln for ln in out.splitlines()) == 9 and "[10/10] register" in out, out
    (second,) = set(root.iterdir()) - runs_before
    assert sorted(p.name for p in second.iterdir()) == ["register"]  # every other task was a cache hit
    assert str(client.get_model_version_by_alias("pxpo-test", "champion").version) == "1"  # margin 100: not promoted



@pytest.mark.slow
def test_local_pipeline_trains_from_model_made_preference_maps_and_registers(workdir, tiny_model_dir, monkeypatch, capsys):
    """Issue 24 through kfp.local: paired sampling, model-made preference maps, D3PO, evaluation, registration.
    After the default pipeline above (same workdir), base-model and prepare are cache hits; run alone, they run."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = {
        "sample": {"batch_size": 4, "num_steps": 3, "pairs": True, "pair_shared_steps": 1},
        "reward": {"preference_scale": 4.0},
        "train": {"algorithm": "d3po", "batch_size": 2, "use_lora": True, "learning_rate": 1e-2, "probe_every": 0},
        "evaluate": {"samples_per_prompt": 2},
        "register": {"model_name": "pxpo-pref", "min_gain": -1.0},
    }
    pfile = workdir.parent / "params-pref.yaml"
    pfile.write_text(yaml.safe_dump(params))
    root = workdir / "kfp_outputs"
    before = set(root.iterdir()) if root.exists() else set()
    code = main(["pipeline", "run", "--local", "--params", str(pfile), "--rounds", "1", "--workdir", str(workdir),
                 "--model-ref", str(tiny_model_dir), "--prompts-uri", str(ROOT / "data" / "prompts.csv")])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "registered pxpo-pref v1" in out, out
    if before:  # after the default pipeline: its base-model and prepare outputs are reused, nothing else is
        cached = sorted(ln.split()[1] for ln in out.splitlines() if ln.startswith("[") and " CACHED " in ln)
        assert cached == ["base-model", "prepare"], out
    (run,) = set(root.iterdir()) - before
    prefs = list(run.rglob("preference_maps.safetensors"))
    assert prefs and load_file(str(prefs[0]))["pairs"].shape == (2, 2)  # the label task's model-made maps
    evals = list(run.rglob("evaluation/metrics.json"))
    assert evals and "pref_accuracy" in json.loads(evals[0].read_text())

    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}")
    client = MlflowClient()
    (mv,) = client.search_model_versions("name='pxpo-pref'")
    logged = set(client.get_run(mv.run_id).data.metrics)
    assert {"train.pref_accuracy", "pref_accuracy"} <= logged, sorted(logged)


def _kfp_stream(task, status="SUCCESS", summary="did it", body=("noise",)):
    """What kfp.local writes to stdout for one task (colours included)."""
    cyan, end = "\x1b[96m", "\x1b[0m"
    lines = [f"15:00:00.000 - INFO - Executing task {cyan}'{task}'{end}", "15:00:00.001 - INFO - Streamed logs:", ""]
    lines += [f"    {b}" for b in body]
    if summary:
        lines.append(f"    pxpo summary: {summary}")
    lines.append(f"15:00:01.000 - INFO - Task {cyan}'{task}'{end} finished with status \x1b[92m{status}{end}")
    return "\n".join(lines) + "\n"


def test_task_progress_one_line_per_task(tmp_path):
    import io

    from pxpo.kubeflow.local_progress import TaskProgress

    term = io.StringIO()
    p = TaskProgress(tmp_path / "logs", total=3, out=term)
    p.write(_kfp_stream("prepare", summary="prepared 40 prompts", body=('{"executorInput": {"params_train": "..."}}',)))
    p.write("15:00:02.000 - INFO - Task sample cache hit (key=abc); skipping execution.\n")
    for chunk in (_kfp_stream("train", "FAILURE", summary=None, body=("Traceback", "ValueError: boom")),):
        p.write(chunk[:17])  # kfp writes in pieces
        p.write(chunk[17:])
    p.close()
    lines = term.getvalue().splitlines()
    assert lines[0].startswith("[1/3] prepare") and "SUCCESS" in lines[0] and lines[0].endswith("prepared 40 prompts")
    assert lines[1].startswith("[2/3] sample") and "CACHED" in lines[1]
    assert lines[2].startswith("[3/3] train") and "FAILURE" in lines[2] and str(tmp_path / "logs" / "train.log") in lines[2]
    assert any("ValueError: boom" in ln for ln in lines[3:])  # the failed task's tail
    assert "executorInput" not in term.getvalue()
    assert "executorInput" in (tmp_path / "logs" / "prepare.log").read_text()
    assert "\x1b[" not in (tmp_path / "logs" / "pipeline.log").read_text()
    assert p.failed == ["train"]


def test_count_tasks_of_the_pipeline():
    from pipelines.pxpo_pipeline import PipelineOptions, build_pipeline
    from pxpo.kubeflow.local_progress import count_tasks

    opts = PipelineOptions()
    opts.rounds = 2
    assert count_tasks(build_pipeline(opts)) == 10  # base-model, prepare, 2 x (sample, label, train), evaluate, register


def test_launcher_repeats_the_stage_summary(capsys):
    import sys

    from pxpo.kubeflow.launcher import SUMMARY_PREFIX, run_command

    run_command([sys.executable, "-c", "print('step 1'); print('trained 2 round(s)'); print()"])
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == SUMMARY_PREFIX + "trained 2 round(s)"


def test_torchvision_fallback_warning_is_silenced():
    import subprocess
    import sys

    code = (
        "from pxpo.quiet import silence_uninformative_warnings; silence_uninformative_warnings(); "
        "import transformers; transformers.CLIPImageProcessor; import logging; "
        "logging.getLogger('transformers.utils.import_utils').warning('another message')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torchvision" not in r.stderr and "another message" in r.stderr
