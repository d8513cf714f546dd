"""The human-in-the-loop pipelines (label.mode: human) compile to their golden specs and hand off by URI."""

import re
from pathlib import Path

import pytest
import yaml

from pxpo.kubeflow.launcher import STAGE_SECTIONS

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = {name: ROOT / "tests" / "golden" / f"{name}.yaml" for name in ("pxpo_human_push", "pxpo_human_train")}


def normalise(text: str) -> str:
    text = re.sub(r"sdkVersion: kfp-[\w.]+", "sdkVersion: kfp-X", text)
    return re.sub(r"(image: [\w./-]+/pxpo-(?:cpu|cuda)):[\w.+-]+", r"\1:TAG", text)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from pipelines.human_in_the_loop import compile_human_pipelines

    push, train = compile_human_pipelines(tmp_path_factory.mktemp("human"))
    return {"pxpo_human_push": push.read_text(), "pxpo_human_train": train.read_text()}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_compiled_specs_match_golden(compiled, name):
    """Regenerate after an intended change (also of a shared component, e.g. components/train.py):
    `pxpo pipeline compile --params /dev/null --out tests/golden/x.yaml label.mode=human`."""
    assert normalise(compiled[name]) == normalise(GOLDEN[name].read_text()), f"differs from {GOLDEN[name]}"


def _tasks(text):
    return yaml.safe_load_all(text).__next__()["root"]["dag"]["tasks"]


def test_push_pipeline_ends_after_sampling_with_the_push(compiled):
    tasks = _tasks(compiled["pxpo_human_push"])
    assert set(tasks) == {"base-model", "prepare", "sample", "label-studio-push"}
    assert set(tasks["label-studio-push"]["dependentTasks"]) == {"sample"}
    assert set(tasks["label-studio-push"]["inputs"]["parameters"]) == {"params_label", "params_reward"}


def test_train_pipeline_starts_from_the_pulled_maps(compiled):
    tasks = _tasks(compiled["pxpo_human_train"])
    assert set(tasks) == {"base-model", "prepare", "importer", "label-studio-pull", "train", "evaluate", "register"}
    assert tasks["importer"]["inputs"]["parameters"]["uri"]["componentInputParameter"] == "trajectories_uri"
    assert set(tasks["label-studio-pull"]["dependentTasks"]) == {"importer"}
    assert "label-studio-pull" in tasks["train"]["dependentTasks"]
    assert tasks["train"]["inputs"]["artifacts"]["labelled"]["taskOutputArtifact"]["producerTask"] == "label-studio-pull"
    assert tasks["register"]["inputs"]["artifacts"]["labels_validation"]["taskOutputArtifact"]["producerTask"] == "label-studio-pull"
    for name in ("train", "evaluate", "register", "prepare"):
        given = {k.removeprefix("params_") for k in tasks[name]["inputs"]["parameters"] if k.startswith("params_")}
        assert given == set(STAGE_SECTIONS[name]), name
    assert set(tasks["label-studio-pull"]["inputs"]["parameters"]) == {"params_label"}


def test_label_studio_tasks_get_the_token_secret(compiled):
    for name, task in (("pxpo_human_push", "exec-label-studio-push"), ("pxpo_human_train", "exec-label-studio-pull")):
        docs = list(yaml.safe_load_all(compiled[name]))
        k8s = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"][task]
        env = [e["envVar"] for s in k8s["secretAsEnv"] for e in s["keyToEnv"]]
        assert env == ["LABEL_STUDIO_API_KEY"]


def test_pipeline_compile_in_human_mode_writes_both(tmp_path):
    from pxpo.cli import main

    assert main(["pipeline", "compile", "--params", "/dev/null", "--out", str(tmp_path / "p.yaml"), "label.mode=human"]) == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"pxpo_human_push.yaml", "pxpo_human_train.yaml"}
