"""The Kubeflow pipeline compiles to the golden spec; GPU and Kubernetes options land in it; each task
gets only its params sections; submit uses it."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.commands import compile_pipeline, pipeline_arguments, submit
from pxpo.config import load_config
from pxpo.errors import PxpoInputError
from pxpo.kubeflow.launcher import STAGE_SECTIONS

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


_COMPILED: dict = {}


def _compile(tmp_path, **opts):
    """The compiled spec of the default config with ``opts``: compiled once per set of options in this module
    (compilation is deterministic and takes seconds; the tests only read the text)."""
    key = repr(sorted(opts.items()))
    if key not in _COMPILED:
        cfg = load_config(None)
        _COMPILED[key] = compile_pipeline(cfg, tmp_path / "p.yaml", opts or None).read_text()
    return _COMPILED[key]


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


def test_components_launch_the_stage_as_a_child_process(tmp_path):
    """Every component goes through pxpo.kubeflow.launcher (a `pxpo <stage>` child), none calls the CLI in-process."""
    spec = _docs(_compile(tmp_path, rounds=1))[0]
    for name, ex in spec["deploymentSpec"]["executors"].items():
        source = ex["container"]["command"][-1]
        assert "from pxpo.kubeflow.launcher import" in source and "run_stage" in source, name
        assert "pxpo.cli" not in source, name


def test_image_tag_follows_package_version(tmp_path):
    import pxpo

    text = _compile(tmp_path, rounds=1)
    tags = set(re.findall(r"image: \S+/pxpo-(?:cpu|cuda):(\S+)", text))
    assert tags == {pxpo.__version__}


def test_retries_with_backoff_on_gpu_tasks_and_register(tmp_path):
    spec = _docs(_compile(tmp_path, rounds=1, retries=3, retry_backoff="30s", retry_backoff_factor=3.0, retry_backoff_max="600s"))[0]
    tasks = spec["root"]["dag"]["tasks"]
    for name in ("sample", "train", "evaluate", "register"):
        assert tasks[name]["retryPolicy"] == {
            "maxRetryCount": 3, "backoffDuration": "30s", "backoffFactor": 3.0, "backoffMaxDuration": "600s",
        }, name
    for name in ("prepare", "label"):  # deterministic CPU work: a retry would fail the same way
        assert "retryPolicy" not in tasks[name], name
    spec = _docs(_compile(tmp_path, rounds=1, retries=0))[0]
    assert not any("retryPolicy" in t for t in spec["root"]["dag"]["tasks"].values())


def test_register_gets_credentials_from_secrets(tmp_path):
    spec, platform = _docs(_compile(tmp_path, rounds=1, mlflow_secret="mlflow-creds", artifact_secret="minio-creds"))
    execs = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    secrets = {s["secretName"]: s for s in execs["exec-register"]["secretAsEnv"]}
    assert set(secrets) == {"mlflow-creds", "minio-creds"}
    assert {m["envVar"] for m in secrets["mlflow-creds"]["keyToEnv"]} >= {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    assert {m["envVar"] for m in secrets["minio-creds"]["keyToEnv"]} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(s["optional"] for s in secrets.values())  # a cluster without the secret still runs (local MLflow)
    assert not any("secretAsEnv" in e for name, e in execs.items() if name != "exec-register")
    _, platform = _docs(_compile(tmp_path, rounds=1, mlflow_secret=None, artifact_secret=None))
    assert "secretAsEnv" not in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].get("exec-register", {})


def test_register_receives_the_run_id(tmp_path):
    spec = _docs(_compile(tmp_path, rounds=1))[0]
    reg = spec["root"]["dag"]["tasks"]["register"]["inputs"]["parameters"]
    assert reg["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"  # dsl.PIPELINE_JOB_ID_PLACEHOLDER
    assert reg["run_name"]["runtimeValue"]["constant"] == "{{$.pipeline_job_name}}"
    assert spec["root"]["dag"]["tasks"]["register"]["cachingOptions"] == {}  # never cached: a new run id each run
    executor = spec["deploymentSpec"]["executors"]["exec-register"]["container"]["command"][-1]
    assert "KFP_RUN_ID" in executor  # what pxpo.mlflow's standard tags read


def test_pipeline_config_ttl_and_deadline(tmp_path):
    _, platform = _docs(_compile(tmp_path, rounds=1, ttl_s=3600, deadline_s=7200))
    assert platform["platforms"]["kubernetes"]["pipelineConfig"] == {"resourceTtlOnCompletion": 3600, "activeDeadlineSeconds": 7200}


# ----------------------------------------------------------------------------- per-task params (caching)


def _task_inputs(spec: dict, arguments: dict) -> dict[str, dict]:
    """Each task's parameter inputs as the run resolves them (pipeline arguments, else defaults, else constants)."""
    defaults = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    out = {}
    for name, task in spec["root"]["dag"]["tasks"].items():
        resolved = {}
        for key, value in task.get("inputs", {}).get("parameters", {}).items():
            if "componentInputParameter" in value:
                ref = value["componentInputParameter"]
                resolved[key] = arguments.get(ref, defaults.get(ref))
            else:
                resolved[key] = value.get("runtimeValue", {}).get("constant")
        out[name] = resolved
    return out


def _params_file(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return load_config(str(p))


def _arguments(cfg):
    return pipeline_arguments(cfg, prompts_uri="/data/prompts.csv", model_ref="org/model", mlflow_tracking_uri="")


def test_each_task_gets_only_its_params_sections(tmp_path):
    """Two params files differing only in `register` give every task but register identical inputs,
    so Kubeflow's cache (keyed on the inputs) re-runs only register."""
    spec = _docs(_compile(tmp_path, rounds=2))[0]
    a = _params_file(tmp_path, "a.yaml", "register:\n  margin: 0.0\n  model_name: pxpo-a\n")
    b = _params_file(tmp_path, "b.yaml", "register:\n  margin: 0.05\n  model_name: pxpo-a\n")
    ia, ib = _task_inputs(spec, _arguments(a)), _task_inputs(spec, _arguments(b))
    assert {t for t in ia if ia[t] != ib[t]} == {"register"}

    # a change re-runs the tasks that read the section (register, uncached, logs them all); downstream
    # tasks re-run through their changed input artifacts, upstream ones stay cached
    default = _task_inputs(spec, _arguments(load_config(None)))

    def changed(text):
        inputs = _task_inputs(spec, _arguments(_params_file(tmp_path, "c.yaml", text)))
        return {t for t in default if default[t] != inputs[t]}

    assert changed("train:\n  learning_rate: 0.01\n") == {"train", "train-2", "register"}
    assert changed("reward:\n  kwargs: {layout: top_bright}\n") == {"label", "label-2", "train", "train-2", "evaluate", "register"}
    assert changed("sample:\n  guidance_scale: 5.0\n") == {"sample", "sample-2", "train", "train-2", "evaluate", "register"}
    assert changed("prepare:\n  heldout_fraction: 0.3\n") == {"prepare", "register"}


def test_task_params_inputs_follow_stage_sections(tmp_path):
    spec = _docs(_compile(tmp_path, rounds=1))[0]
    tasks = spec["root"]["dag"]["tasks"]
    for name, task in tasks.items():
        stage = task["componentRef"]["name"].removeprefix("comp-").replace("-", "_")
        given = {k.removeprefix("params_") for k in task.get("inputs", {}).get("parameters", {}) if k.startswith("params_")}
        assert given == set(STAGE_SECTIONS.get(stage, ())), name
    args = _arguments(load_config(None))
    for key, value in args.items():
        if key.startswith("params_"):
            section = key.removeprefix("params_")
            assert set(yaml.safe_load(value)) == {section}  # each argument is its own `section: ...` YAML


def test_submit_rejects_a_stale_package(tmp_path):
    stale = tmp_path / "old.yaml"
    stale.write_text(yaml.safe_dump({"root": {"inputDefinitions": {"parameters": {"params": {"parameterType": "STRING"}}}}}))
    with pytest.raises(PxpoInputError, match="recompile"):
        submit(load_config(None), host="http://kfp.invalid", package=stale, prompts_uri="p", model_ref="m",
               mlflow_tracking_uri="", experiment="pxpo", run_name=None, client=object())


def test_pipeline_packages_import_without_the_checkout_on_sys_path(tmp_path):
    """`pipelines` and `components` are installed with pxpo: no sys.path edits, any working directory."""
    r = subprocess.run([sys.executable, "-c", "import pipelines.pxpo_pipeline, components.train"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for path in (ROOT / "src" / "pxpo", ROOT / "components", ROOT / "pipelines"):
        for f in path.rglob("*.py"):
            assert "sys.path" not in f.read_text(), f"{f} edits sys.path"


def test_submit_sends_the_compiled_spec(tmp_path):
    calls = {}

    class FakeClient:
        def create_run_from_pipeline_package(self, package, arguments, experiment_name, run_name, enable_caching):
            calls.update(package=package, arguments=arguments, experiment=experiment_name)

            class R:
                run_id = "run-123"

            return R()

    cfg = load_config(None, ["register.margin=0.25", "seed=7"])
    pkg = tmp_path / "spec.yaml"
    run_id = submit(
        cfg, host="http://kfp.invalid", package=pkg, prompts_uri="/data/prompts.csv", model_ref="org/model",
        mlflow_tracking_uri="http://mlflow:5000", experiment="pxpo", run_name="t", client=FakeClient(),
    )
    assert run_id == "run-123" and calls["package"] == str(pkg) and pkg.is_file()
    spec = _docs(pkg.read_text())[0]
    declared = set(spec["root"]["inputDefinitions"]["parameters"])
    assert set(calls["arguments"]) == declared
    assert calls["arguments"]["model_ref"] == "org/model"
    assert yaml.safe_load(calls["arguments"]["params_register"])["register"]["margin"] == 0.25
    assert yaml.safe_load(calls["arguments"]["params_seed"]) == {"seed": 7}
