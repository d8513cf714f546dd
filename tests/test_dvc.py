"""`dvc repro` for real in a temporary git repo: the whole DAG, then only what a param or code change touches."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "base": {"vae_steps": 2, "unet_steps": 2, "lcm_steps": 2},
    "sample": {"batch_size": 4, "num_steps": 3},
    "train": {"batch_size": 2, "epochs": 2, "use_lora": True, "learning_rate": 1e-2, "clip_range": 0.1},
    "evaluate": {"samples_per_prompt": 2},
}


def _merge(a, b):
    for k, v in b.items():
        a[k] = _merge(a.get(k, {}), v) if isinstance(v, dict) else v
    return a


def _sh(cmd, cwd, env):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout + r.stderr


def _repo(tmp_path):
    """dvc.yaml, params.yaml (TINY budgets), data and src in a fresh git + DVC repo; returns (repo, env)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for f in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / f, repo / f)
    shutil.copytree(ROOT / "data", repo / "data", ignore=shutil.ignore_patterns("prepared"))
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(_merge(params, TINY), sort_keys=False))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    _sh(["git", "init", "-q"], repo, env)
    _sh([str(BIN / "dvc"), "init", "-q"], repo, env)
    _sh([str(BIN / "dvc"), "config", "core.analytics", "false"], repo, env)
    _sh(["git", "add", "-A"], repo, env)
    _sh(["git", "commit", "-qm", "init"], repo, env)
    return repo, env


def _edit_code(repo, rel="src/pxpo/core/ddim.py"):
    """A content change (DVC hashes content, so a bare mtime touch would not count)."""
    f = repo / rel
    assert f.is_file(), f"{rel} moved: update this test"
    f.write_text(f.read_text() + "\n# edited by test_dvc\n")


def _changed_code_stages(repo, env) -> dict[str, list[str]]:
    """`dvc status --json`: stage -> its changed deps under src/."""
    r = subprocess.run([str(BIN / "dvc"), "status", "--json"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"dvc status failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    status = json.loads(r.stdout.strip() or "{}")
    out = {}
    for stage, changes in status.items():
        for change in changes:
            if isinstance(change, dict):
                deps = [d for d in change.get("changed deps", {}) if d.startswith("src/")]
                if deps:
                    out.setdefault(stage.split(":")[-1], []).extend(deps)
    return out


def test_code_change_marks_the_stages_that_run_it(tmp_path):
    """Cheap (no stage runs): record placeholder outputs with `dvc commit`, edit core/ddim.py;
    `dvc status` then reports the stages that run DDIM code (sample, and train and evaluate,
    which re-score and sample with it) as changed, and not the prompt-data stage."""
    repo, env = _repo(tmp_path)
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for key in ("outs", "metrics", "plots"):
            for o in stage.get(key) or []:
                p = repo / (next(iter(o)) if isinstance(o, dict) else o)
                p.parent.mkdir(parents=True, exist_ok=True)
                if p.suffix:  # a file output (metrics, reports, plots)
                    p.write_text("{}\n" if p.suffix == ".json" else "epoch\n")
                else:
                    p.mkdir(exist_ok=True)
                    (p / "placeholder").write_text(name)
    _sh([str(BIN / "dvc"), "commit", "-f"], repo, env)
    assert _changed_code_stages(repo, env) == {}
    assert "up to date" in _sh([str(BIN / "dvc"), "status"], repo, env)

    _edit_code(repo)
    changed = _changed_code_stages(repo, env)
    for stage in ("sample", "train", "evaluate"):
        assert stage in changed, f"editing src/pxpo/core/ddim.py does not change stage {stage!r} (changed: {changed})"
    assert "prepare" not in changed, changed


@pytest.mark.slow
def test_dvc_repro_end_to_end_and_partial_rerun(tmp_path):
    repo, env = _repo(tmp_path)

    out = _sh([str(BIN / "dvc"), "repro"], repo, env)
    for stage in ("base", "lcm", "prepare", "sample", "label", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in out
    assert (repo / "dvc.lock").is_file()
    decision = yaml.safe_load((repo / "metrics" / "register.json").read_text())
    assert decision["version"] == "1" or decision["version"] == 1
    assert "reward_mean" in yaml.safe_load((repo / "metrics" / "evaluate.json").read_text())
    assert (repo / "reports" / "train_metrics.csv").read_text().startswith("epoch,")

    # nothing changed: nothing reruns
    out = _sh([str(BIN / "dvc"), "repro"], repo, env)
    assert "Running stage" not in out

    # a training param: train and what follows rerun, the data stages do not
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["train"]["learning_rate"] = 5e-3
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    out = _sh([str(BIN / "dvc"), "repro"], repo, env)
    for stage in ("train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in out
    for stage in ("base", "lcm", "prepare", "sample", "label"):
        assert f"Running stage '{stage}'" not in out
    status = _sh([str(BIN / "dvc"), "status"], repo, env)
    assert "up to date" in status

    # sampling code: the stages that run it are out of date (status only: no second full run)
    _edit_code(repo)
    changed = _changed_code_stages(repo, env)
    for stage in ("sample", "train", "evaluate"):
        assert stage in changed, f"editing src/pxpo/core/ddim.py does not change stage {stage!r} (changed: {changed})"
    assert "prepare" not in changed, changed
