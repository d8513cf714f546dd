"""The Kubeflow pipeline compiles to the golden spec; GPU and Kubernetes options land in it; submit uses it."""

import re
from pathlib import Path

import pytest
import yaml

from pxpo.config import load_config
from pxpo.pipeline_cli import compile_pipeline, submit

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "pxpo_pipeline.yaml"


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def normalise(text: str) -> str:
    """Drop what may change without changing the pipeline: sdk version and image tags."""
    text = re.sub(r"sdkVersion: kfp-[\w.]+", "sdkVersion: kfp-X", text)
    text = re.sub(r"(image: [\w./-]+/pxpo-(?:cpu|cuda)):[\w.+-]+", r"\1:TAG", text)
    return text


def _compile(tmp_path, **opts):
    cfg = load_config(None)
    return compile_pipeline(cfg, tmp_path / "p.yaml", opts or None).read_text()


def test_compiled_spec_matches_golden(tmp_path):
    """Regenerate after an intended change: `pxpo pipeline compile --params /dev/null --out tests/golden/pxpo_pipeline.yaml`."""
    got = normalise(_compile(tmp_path))
    assert got == normalise(GOLDEN.read_text()), "compiled pipeline differs from tests/golden/pxpo_pipeline.yaml"


def _docs(text):
    return list(yaml.safe_load_all(text))


def test_dag_rounds_and_order(tmp_path):
    spec = _docs(_compile(tmp_path, rounds=2))[0]
    tasks = spec["root"]["dag"]["tasks"]
    names = set(tasks)
    assert {"prepare", "base-model", "sample", "sample-2", "label", "label-2", "train", "train-2", "evaluate", "register"} <= names
    assert "sample-3" not in names

    def deps(t):
        return set(tasks[t].get("dependentTasks", []))

    assert {"base-model", "prepare"} <= deps("sample")
    assert "train" in deps("sample-2")  # round 2 samples from round 1's policy
    assert "train" in deps("train-2")  # and continues its optimizer state
    assert "train-2" in deps("evaluate")
    assert {"evaluate", "prepare", "label-2"} <= deps("register")


def test_gpu_and_kubernetes_options(tmp_path):
    text = _compile(
        tmp_path,
        rounds=1,
        node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        cache_pvc="hf-cache",
    )
    spec, platform = _docs(text)
    execs = spec["deploymentSpec"]["executors"]
    train = execs["exec-train"]["container"]
    assert train["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert int(train["resources"]["accelerator"]["resourceCount"]) == 1
    assert "pxpo-cuda" in train["image"] and "pxpo-cpu" in execs["exec-label"]["container"]["image"]
    assert "accelerator" not in execs["exec-label"]["container"].get("resources", {})
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert k8s["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert k8s["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert k8s["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
    assert k8s["pvcMount"][0]["mountPath"] == "/cache"
    assert int(k8s["activeDeadlineSeconds"]) == 6 * 3600
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["train"]["retryPolicy"]["maxRetryCount"] == 2


def test_image_tag_follows_package_version(tmp_path):
    import pxpo

    text = _compile(tmp_path, rounds=1)
    tags = set(re.findall(r"image: \S+/pxpo-(?:cpu|cuda):(\S+)", text))
    assert tags == {pxpo.__version__}


def test_submit_sends_the_compiled_spec(tmp_path):
    calls = {}

    class FakeClient:
        def create_run_from_pipeline_package(self, package, arguments, experiment_name, run_name, enable_caching):
            calls.update(package=package, arguments=arguments, experiment=experiment_name)

            class R:
                run_id = "run-123"

            return R()

    cfg = load_config(None)
    pkg = tmp_path / "spec.yaml"
    run_id = submit(
        cfg, "seed: 0\n", host="http://kfp.invalid", package=pkg, prompts_uri="/data/prompts.csv", model_ref="org/model",
        mlflow_tracking_uri="http://mlflow:5000", experiment="pxpo", run_name="t", client=FakeClient(),
    )
    assert run_id == "run-123" and calls["package"] == str(pkg) and pkg.is_file()
    spec = _docs(pkg.read_text())[0]
    declared = set(spec["root"]["inputDefinitions"]["parameters"])
    assert set(calls["arguments"]) == declared
    assert calls["arguments"]["model_ref"] == "org/model"
