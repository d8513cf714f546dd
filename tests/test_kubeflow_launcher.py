"""The launcher KFP components run: `pxpo <stage>` as a child process, given only its params sections."""

import sys
from pathlib import Path

import pytest
import yaml

from pxpo.config import load_config, section_yaml
from pxpo.kubeflow.launcher import (
    PIPELINE_SECTIONS,
    STAGE_SECTIONS,
    params_text,
    run_command,
    run_stage,
    section_params,
    stage_command,
)


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_child_output_is_streamed(capsys):
    run_command(_py("import sys; print('to stdout', flush=True); print('to stderr', file=sys.stderr)"), what="pxpo demo")
    out, err = capsys.readouterr()
    assert "to stdout" in out and "to stderr" in err


def test_non_zero_exit_fails_the_task_with_the_stage_code_and_last_output():
    code = "import sys; print('loading', flush=True); print('error: trajectories: missing', file=sys.stderr); sys.exit(2)"
    with pytest.raises(RuntimeError) as e:
        run_command(_py(code), what="pxpo label")
    msg = str(e.value)
    assert msg.startswith("pxpo label failed with exit code 2")
    assert "error: trajectories: missing" in msg


def test_a_killed_child_names_the_signal():
    with pytest.raises(RuntimeError, match="pxpo train was killed by SIGKILL"):
        run_command(_py("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"), what="pxpo train")


def test_child_gets_extra_environment(capsys):
    run_command(_py("import os; print(os.environ['KFP_RUN_ID'], os.environ['PYTHONUNBUFFERED'])"), env={"KFP_RUN_ID": "run-42"})
    assert "run-42 1" in capsys.readouterr().out


def test_stage_command_shape():
    cmd = stage_command(["register"], ["--policy", "p", "--eval", "e", "--validation", "a.json", "b.json"], params_file="/t/params.yaml",
                        sections=["model", "register"], overrides=["model.path=/m"])
    assert cmd[:3] == [sys.executable, "-m", "pxpo.cli"]
    assert cmd[3:] == ["register", "--quiet", "--params", "/t/params.yaml", "--sections", "model,register",
                       "--policy", "p", "--eval", "e", "--validation", "a.json", "b.json", "--", "model.path=/m"]
    # a list option last cannot swallow the overrides: the CLI parses them apart
    from pxpo.cli import build_parser

    ns = build_parser().parse_args(cmd[3:])
    assert ns.validation == ["a.json", "b.json"] and ns.overrides == ["model.path=/m"] and ns.sections == "model,register"
    # room for a multi-process launch of the same module (one process per GPU)
    acc = stage_command(["train"], launcher=["accelerate", "launch", "--num_processes", "4"])
    assert acc == ["accelerate", "launch", "--num_processes", "4", "-m", "pxpo.cli", "train", "--quiet"]
    assert stage_command(["base", "build"], ["--out", "m"]) == [sys.executable, "-m", "pxpo.cli", "base", "build", "--quiet", "--out", "m"]


def test_params_text_joins_sections_and_loads_restricted():
    cfg = load_config(None, ["register.margin=0.5", "seed=3"])
    data = cfg.to_dict()
    text = params_text({s: section_yaml(data, [s]) for s in ("seed", "register")})
    assert yaml.safe_load(text) == {"seed": 3, "register": data["register"]}
    with pytest.raises(ValueError, match="params_model must be YAML of the form 'model: ...'"):
        params_text({"model": "register:\n  margin: 1\n"})


def test_stage_sections_are_config_keys_and_wired_by_name():
    from pxpo.config import KEYS

    for stage, sections in STAGE_SECTIONS.items():
        assert set(sections) <= set(KEYS), stage
        assert "pipeline" not in sections  # compile-time only
    assert set(PIPELINE_SECTIONS) == {s for v in STAGE_SECTIONS.values() for s in v}
    got = section_params("label", {s: f"<{s}>" for s in PIPELINE_SECTIONS})
    assert got == {"params_reward": "<reward>"}


def test_run_stage_refuses_sections_the_stage_does_not_read():
    with pytest.raises(ValueError, match="pxpo label reads the params sections"):
        run_stage(["label"], {"reward": "reward: {}\n", "train": "train: {}\n"}, ["--trajectories", "x"])


def test_run_stage_runs_pxpo_and_fails_on_bad_input(tmp_path):
    """A real `pxpo label` child, given only the reward section: bad input -> exit 2 -> RuntimeError with the message."""
    params = {"reward": section_yaml(load_config(None).to_dict(), ["reward"])}
    with pytest.raises(RuntimeError) as e:
        run_stage(["label"], params, ["--trajectories", str(tmp_path / "missing")])
    assert str(e.value).startswith("pxpo label failed with exit code 2")
    assert "missing" in str(e.value)


def test_json_metrics_go_to_the_artifact_and_its_file(tmp_path):
    import json

    from pxpo.kubeflow.launcher import log_json_metrics

    class FakeMetrics:
        path = str(tmp_path / "out" / "metrics")
        metadata: dict = {}

        def log_metric(self, k, v):
            self.metadata[k] = v

    src = tmp_path / "m.jsonl"
    src.write_text('{"epoch": 0, "reward_mean": 0.1}\n{"epoch": 1, "reward_mean": 0.5, "ok": true, "name": "x"}\n')
    m = FakeMetrics()
    log_json_metrics(m, str(src))
    assert m.metadata == {"epoch": 1.0, "reward_mean": 0.5}
    assert json.loads(Path(m.path).read_text()) == m.metadata  # kfp.local caches only outputs that exist on disk
