"""Multi-node training through Kubeflow Trainer v2: the TrainJob the pipeline's train task creates.

:func:`trainjob_manifest` builds the ``trainer.kubeflow.org/v1alpha1``
TrainJob (runtime ``torch-distributed``): ``numNodes`` pods, each with
``resourcesPerNode`` GPUs, all mounting one ReadWriteMany PVC at
``mount_path`` (trajectories in, checkpoints / state / policy out). The
runtime injects torchrun's rendezvous variables (``PET_NNODES``,
``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``,
``PET_MASTER_PORT``) into every node; the trainer's command is
``python -m torch.distributed.run -m pxpo.cli train ...``, which reads them:
``numNodes x GPUs`` processes, one global run (:mod:`pxpo.training.distributed`).

The volumes, node selector and tolerations reach the runtime's ``node`` job
(and its ``node`` container) through the pod-level override field, which the
Trainer releases named differently; the API server silently prunes a field its
CRD does not declare, so the manifest must match the installed release
(``trainer_api``, :data:`TRAINER_APIS`):

* ``"v2.3"`` / ``"v2.2"`` (default; v2.3 is current): ``spec.runtimePatches``,
  one entry owned by manager :data:`PATCH_MANAGER`;
* ``"v2.1"``: ``spec.podTemplateOverrides`` (removed in v2.2).

v2.0's ``podSpecOverrides`` is not written. tests/test_trainjob_schema.py checks
every variant against the released CRDs' schemas (tests/k8s/).

:func:`submit_and_wait` creates it with the Kubernetes Python client (the
task's service account needs ``create/get/delete`` on ``trainjobs``) and polls
its ``Complete`` / ``Failed`` condition. The manifest is plain data, pinned by
a reviewed golden file (``tests/golden/trainjob.yaml``); docs/distributed.md
shows how to run it on a cluster.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
NODE_JOB = "node"  # the torch-distributed runtime's replicated job (and its container)
PATCH_MANAGER = "pxpo"  # owner of pxpo's entry in spec.runtimePatches (Trainer v2.2+)
# Kubeflow Trainer release -> the TrainJob field that carries pod-level overrides
TRAINER_APIS = {"v2.3": "runtimePatches", "v2.2": "runtimePatches", "v2.1": "podTemplateOverrides"}
DEFAULT_TRAINER_API = "v2.3"  # the current release


def train_command(params_file: str, args: Sequence[str], overrides: Sequence[str] = ()) -> list[str]:
    """The trainer container's command: torchrun (rendezvous from PET_*) around ``pxpo train``."""
    cmd = ["python", "-m", "torch.distributed.run", "-m", "pxpo.cli", "train", "--quiet", "--params", params_file, *args]
    return [*cmd, *(["--", *overrides] if overrides else [])]


def trainjob_manifest(
    name: str,
    *,
    image: str,
    command: Sequence[str],
    num_nodes: int,
    gpus_per_node: int,
    pvc: str | None,
    mount_path: str = "/pxpo-shared",
    accelerator_type: str = "nvidia.com/gpu",
    cpu: str = "8",
    memory: str = "64Gi",
    shm_size: str | None = "16Gi",
    runtime: str = "torch-distributed",
    env: Mapping[str, str] | None = None,
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping] = (),
    labels: Mapping[str, str] | None = None,
    trainer_api: str = DEFAULT_TRAINER_API,
) -> dict:
    """The TrainJob of a multi-node ``pxpo train``: ``num_nodes`` x ``gpus_per_node`` processes.

    ``pvc``: the ReadWriteMany claim mounted at ``mount_path`` on every node (None: none, and
    ``HF_HOME`` is left to the image); ``shm_size``: a memory ``/dev/shm`` (None: none);
    ``trainer_api``: the installed Kubeflow Trainer release (:data:`TRAINER_APIS`).
    """
    if num_nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"num_nodes and gpus_per_node must be >= 1, got {num_nodes}, {gpus_per_node}")
    if trainer_api not in TRAINER_APIS:
        raise ValueError(f"trainer_api {trainer_api!r}: pxpo writes TrainJobs for Kubeflow Trainer {', '.join(sorted(TRAINER_APIS))}")
    limits = {accelerator_type: gpus_per_node}
    resources = {"limits": {**limits, "memory": memory}, "requests": {"cpu": cpu, "memory": memory, **limits}}
    environment = {"PYTHONUNBUFFERED": "1", **({"HF_HOME": f"{mount_path}/hf-home"} if pvc else {}), **(env or {})}
    volumes, mounts = [], []
    if pvc:
        volumes.append({"name": "pxpo-shared", "persistentVolumeClaim": {"claimName": pvc}})
        mounts.append({"name": "pxpo-shared", "mountPath": mount_path})
    if shm_size:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    pod_spec: dict = {}
    if volumes:
        pod_spec["volumes"] = volumes
        pod_spec["containers"] = [{"name": NODE_JOB, "volumeMounts": mounts}]
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod_spec["tolerations"] = [dict(t) for t in tolerations]
    spec: dict = {
        "runtimeRef": {"name": runtime, "apiGroup": GROUP, "kind": "ClusterTrainingRuntime"},
        "trainer": {
            "image": image,
            "command": list(command),
            "numNodes": num_nodes,
            "resourcesPerNode": resources,
            "env": [{"name": k, "value": v} for k, v in environment.items()],
        },
    }
    if pod_spec:
        spec.update(pod_overrides(pod_spec, trainer_api))
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "pxpo", **(labels or {})}},
        "spec": spec,
    }


def pod_overrides(pod_spec: Mapping, trainer_api: str = DEFAULT_TRAINER_API) -> dict:
    """The TrainJob ``spec`` field that applies ``pod_spec`` to the runtime's ``node`` job, as ``trainer_api`` names it.

    v2.2+: ``runtimePatches`` (manager-keyed; job -> Job template -> Pod template);
    v2.1: ``podTemplateOverrides`` (a flat ``targetJobs`` list).
    """
    field = TRAINER_APIS[trainer_api]
    if field == "podTemplateOverrides":
        return {field: [{"targetJobs": [{"name": NODE_JOB}], "spec": dict(pod_spec)}]}
    job = {"name": NODE_JOB, "template": {"spec": {"template": {"spec": dict(pod_spec)}}}}
    return {field: [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [job]}}}}]}


def job_state(obj: Mapping) -> str | None:
    """``"Complete"`` / ``"Failed"`` from a TrainJob's status conditions, else None (still running)."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return cond["type"]
    return None


def submit_and_wait(manifest: dict, namespace: str, *, poll_s: float = 30.0, timeout_s: float = 24 * 3600, api=None) -> str:
    """Create the TrainJob and wait for it; raise RuntimeError unless it completes.

    Created with strict field validation: a field the cluster's TrainJob CRD does not declare (a
    manifest for another Trainer release) is an error here instead of being pruned without a word.
    """
    if api is None:
        from kubernetes import client, config

        config.load_incluster_config()
        api = client.CustomObjectsApi()
    name = manifest["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest, field_validation="Strict")
    except Exception as e:  # kubernetes.client.ApiException: status 400 / 422, the server's message in its body
        if getattr(e, "status", None) in (400, 422) and "unknown field" in f"{getattr(e, 'body', '')} {e}":
            raise RuntimeError(
                f"TrainJob {namespace}/{name}: the cluster's Kubeflow Trainer does not declare a field of the manifest"
                f" ({getattr(e, 'body', None) or e}); set PipelineOptions.train_trainer_api to the installed release"
                f" ({', '.join(f'{k}: {v}' for k, v in sorted(TRAINER_APIS.items()))})"
            ) from e
        raise
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = job_state(api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))
        if state == "Complete":
            return state
        if state == "Failed":
            raise RuntimeError(f"TrainJob {namespace}/{name} failed (kubectl describe trainjob {name} -n {namespace})")
        time.sleep(poll_s)
    raise RuntimeError(f"TrainJob {namespace}/{name} did not finish within {timeout_s:.0f}s")


def local_launcher(processes_per_node: int) -> list[str] | None:
    """The component's launcher prefix for one pod: None (one process) or torchrun over its GPUs (0 = all)."""
    import sys

    if processes_per_node == 1:
        return None
    n = "gpu" if processes_per_node == 0 else str(processes_per_node)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", n]


def run_multinode_train(settings: Mapping, params: Mapping[str, str], inputs: Mapping[str, str | None], out: str, overrides: Sequence[str],
                        *, run_id: str, rounds: int, api=None) -> None:
    """The train task of a multi-node pipeline: stage the inputs on the shared PVC, run the TrainJob, copy the policy back.

    ``settings`` (``pipelines.pxpo_pipeline.trainjob_settings``): pvc, mount_path, image, num_nodes,
    gpus_per_node, accelerator_type, namespace, trainer_api, ... ``inputs``: trajectories, dataset, state (or None),
    each a directory of this task; ``overrides``: model.path etc. (paths under the PVC).
    """
    import re
    import shutil
    from pathlib import Path

    from .launcher import params_text

    root = Path(settings["mount_path"]) / "pxpo" / run_id
    root.mkdir(parents=True, exist_ok=True)
    args = ["--rounds", str(rounds)]
    for key, src in inputs.items():
        if src is None:
            continue
        dst = root / key
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        if key == "dataset":
            overrides = [*overrides, f"prompts.source={dst}"]
        else:
            args += [f"--{key}", str(dst)]
    for i, o in enumerate(overrides):  # a base model built by the pipeline lives in this task only: onto the PVC with the rest
        if o.startswith("model.path=") and Path(o.split("=", 1)[1]).is_dir():
            shutil.copytree(o.split("=", 1)[1], root / "model", dirs_exist_ok=True)
            overrides = [*overrides[:i], f"model.path={root / 'model'}", *overrides[i + 1 :]]
    (root / "params.yaml").write_text(params_text(params))
    policy = root / "policy"
    shutil.rmtree(policy, ignore_errors=True)
    command = train_command(str(root / "params.yaml"), [*args, "--out", str(policy)], overrides)
    name = re.sub(r"[^a-z0-9-]", "-", f"pxpo-train-{run_id}".lower())[:63].rstrip("-")
    keys = ("num_nodes", "gpus_per_node", "pvc", "mount_path", "accelerator_type", "cpu", "memory", "shm_size", "runtime", "node_selector", "tolerations",
            "trainer_api")
    manifest = trainjob_manifest(name, image=settings["image"], command=command, **{k: settings[k] for k in keys if k in settings})
    submit_and_wait(manifest, settings.get("namespace", "kubeflow"), api=api)
    shutil.copytree(policy, out, dirs_exist_ok=True)
