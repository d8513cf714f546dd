"""Multi-node training through Kubeflow Trainer v2: the TrainJob manifest (golden), its submission, the pipeline option.

tests/golden/trainjob.yaml is reviewed content: these tests read it and never write it. Its validity
against the released Trainer CRD and runtime is tests/test_trainjob_schema.py's.
"""

import json
from pathlib import Path

import pytest
import yaml

from pxpo.errors import PxpoInputError
from pxpo.kubeflow.trainjob import job_state, local_launcher, run_multinode_train, submit_and_wait, train_command, trainjob_manifest

GOLDEN = Path(__file__).parent / "golden" / "trainjob.yaml"
SETTINGS = {
    "num_nodes": 2, "gpus_per_node": 8, "accelerator_type": "nvidia.com/gpu", "pvc": "pxpo-shared",
    "mount_path": "/pxpo-shared", "namespace": "team-a", "runtime": "torch-distributed",
    "image": "ghcr.io/pxpo/pxpo-cuda:1.0.0", "cpu": "16", "memory": "128Gi", "shm_size": "16Gi",
    "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}


def _manifest():
    root = "/pxpo-shared/pxpo/run-1-1"
    cmd = train_command(f"{root}/params.yaml", ["--rounds", "1", "--trajectories", f"{root}/trajectories", "--out", f"{root}/policy"], ["model.path=/models/sd15"])
    keys = ("num_nodes", "gpus_per_node", "pvc", "mount_path", "accelerator_type", "cpu", "memory", "shm_size", "runtime", "node_selector", "tolerations")
    return trainjob_manifest("pxpo-train-run-1-1", image=SETTINGS["image"], command=cmd, **{k: SETTINGS[k] for k in keys})


def test_trainjob_manifest_matches_golden():
    """The generated manifest equals the hand-reviewed golden file (when the manifest is meant to change: edit
    the golden by hand and review it; tests/test_trainjob_schema.py checks it against Trainer v2.3.0)."""
    m = _manifest()
    assert m == yaml.safe_load(GOLDEN.read_text())
    spec = m["spec"]
    assert m["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and m["kind"] == "TrainJob"
    assert spec["runtimeRef"]["name"] == "torch-distributed"
    assert spec["trainer"]["numNodes"] == 2 and spec["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    # torchrun without rendezvous flags: it reads the PET_* variables the runtime injects on every node
    assert spec["trainer"]["command"][:5] == ["python", "-m", "torch.distributed.run", "-m", "pxpo.cli"]
    assert not any(a.startswith("--nnodes") or a == "--standalone" for a in spec["trainer"]["command"])
    # Trainer v2.2+: the volumes reach the runtime's `node` job and container through runtimePatches
    (patch,) = spec["runtimePatches"]
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert patch["manager"] == "pxpo" and job["name"] == "node" and "podTemplateOverrides" not in spec
    pod = job["template"]["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "pxpo-shared"
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/pxpo-shared"


def test_local_launcher():
    assert local_launcher(1) is None
    assert local_launcher(0)[-2:] == ["--nproc_per_node", "gpu"]
    assert local_launcher(4)[2:] == ["torch.distributed.run", "--standalone", "--nproc_per_node", "4"]


class FakeApi:
    def __init__(self, final="Complete", out=None):
        self.created, self.final, self.out = [], final, out

    def create_namespaced_custom_object(self, group, version, ns, plural, body, field_validation=None):
        assert field_validation == "Strict"  # an undeclared field fails the create instead of being pruned
        self.created.append((group, version, ns, plural, body))
        if self.out:  # what the nodes would write: the policy under the PVC
            policy = Path(body["spec"]["trainer"]["command"][body["spec"]["trainer"]["command"].index("--out") + 1])
            policy.mkdir(parents=True)
            (policy / "metrics.jsonl").write_text('{"epoch": 0}\n')

    def get_namespaced_custom_object(self, group, version, ns, plural, name):
        return {"status": {"conditions": [{"type": self.final, "status": "True"}]}}


def test_multinode_train_stages_inputs_runs_trainjob_and_copies_policy(tmp_path):
    traj = tmp_path / "labelled"
    traj.mkdir()
    (traj / "x").write_text("1")
    data = tmp_path / "data"
    data.mkdir()
    settings = {**SETTINGS, "mount_path": str(tmp_path / "pvc")}
    api = FakeApi(out=True)
    params = {"train": "train:\n  epochs: 1\n"}
    run_multinode_train(settings, params, {"trajectories": str(traj), "dataset": str(data), "state": None}, str(tmp_path / "policy"),
                        ["model.path=/m"], run_id="abc-1", rounds=1, api=api)
    (_, _, ns, plural, body), = api.created
    assert ns == "team-a" and plural == "trainjobs" and body["metadata"]["name"] == "pxpo-train-abc-1"
    cmd = body["spec"]["trainer"]["command"]
    root = tmp_path / "pvc" / "pxpo" / "abc-1"
    assert cmd[cmd.index("--trajectories") + 1] == str(root / "trajectories") and (root / "trajectories" / "x").is_file()
    assert f"prompts.source={root / 'dataset'}" in cmd and "--state" not in cmd
    assert (tmp_path / "policy" / "metrics.jsonl").is_file()
    with pytest.raises(RuntimeError, match="failed"):
        run_multinode_train(settings, params, {"trajectories": str(traj), "dataset": str(data)}, str(tmp_path / "p2"), [], run_id="b", rounds=1,
                            api=FakeApi("Failed"))
    assert job_state({}) is None


def test_a_field_the_cluster_does_not_declare_names_the_trainer_api_option():
    class Rejected(Exception):  # what kubernetes.client.ApiException carries under strict field validation
        status, body = 422, '{"message": "TrainJob in version \\"v1alpha1\\" cannot be handled: unknown field \\"spec.runtimePatches\\""}'

    class OldTrainer(FakeApi):
        def create_namespaced_custom_object(self, *a, **kw):
            raise Rejected()

    with pytest.raises(RuntimeError, match=r"unknown field.*train_trainer_api.*v2.1: podTemplateOverrides"):
        submit_and_wait(_manifest(), "team-a", api=OldTrainer())


def test_pipeline_train_nodes_creates_trainjob_task():
    from kfp import compiler

    from pipelines.pxpo_pipeline import PipelineOptions, build_pipeline

    with pytest.raises(PxpoInputError, match="train_shared_pvc"):
        build_pipeline(PipelineOptions(rounds=1, train_nodes=2))
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "p.yaml"
        compiler.Compiler().compile(build_pipeline(PipelineOptions(rounds=1, train_nodes=2, train_shared_pvc="pxpo-shared")), str(out))
        docs = list(yaml.safe_load_all(out.read_text()))
    spec = docs[0]
    task = spec["root"]["dag"]["tasks"]["train"]
    settings = json.loads(task["inputs"]["parameters"]["trainjob"]["runtimeValue"]["constant"])
    assert settings["num_nodes"] == 2 and settings["pvc"] == "pxpo-shared"
    platform = json.dumps(docs[1])
    assert "pxpo-shared" in platform  # the PVC is mounted in the train task too
