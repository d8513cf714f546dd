"""The pxpo Kubeflow pipeline: prepare -> base -> R x (sample -> label -> train) -> evaluate -> register.

``build_pipeline(options)`` returns a ``@dsl.pipeline`` function with the
rounds unrolled (R is a compile-time option) and the Kubernetes settings of
:class:`PipelineOptions` applied to the tasks. ``pxpo pipeline compile`` writes
its IR YAML; ``pxpo pipeline run --local`` runs it with ``kfp.local``;
``pxpo pipeline submit`` sends it to a KFP endpoint.

The run's parameters are one ``params_<section>`` string per params.yaml
section (``section: value`` YAML) and each task is wired only to the sections
its stage reads (:data:`pxpo.kubeflow.launcher.STAGE_SECTIONS`), so that a
task's cache key changes only when its own params do.
"""


from dataclasses import dataclass, field
from typing import Optional

from kfp import dsl, kubernetes
from kfp.dsl import Artifact

from components.base_model import base_model
from components.evaluate import evaluate
from components.label import label
from components.prepare import prepare
from components.register import register
from components.sample import sample
from components.train import train
from pxpo.kubeflow.launcher import PIPELINE_SECTIONS, section_params


@dataclass
class PipelineOptions:
    """Compile-time options of the pipeline (cluster resources and the unrolled rounds)."""

    rounds: int = 3  # sample -> label -> train rounds
    epochs_per_round: int = 1  # epochs each train task runs (the first on its round's samples)
    accelerator_type: str = "nvidia.com/gpu"  # resource name of the GPU
    accelerator_limit: int = 1  # GPUs per sample / train / evaluate task
    gpu: bool = True  # request GPUs at all (False: CPU-only cluster)
    node_selector: dict[str, str] = field(default_factory=dict)  # e.g. {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    tolerations: list[dict] = field(default_factory=list)  # e.g. [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    shm_size: str = "8Gi"  # emptyDir (Memory) at /dev/shm for dataloaders / NCCL on GPU tasks
    cache_pvc: Optional[str] = None  # PVC mounted at /cache (HF_HOME): model weights downloaded once
    retries: int = 2  # retries of the GPU tasks (preemptible nodes) and of register (MLflow over the network)
    retry_backoff: str = "60s"  # wait before the first retry
    retry_backoff_factor: float = 2.0  # each further retry waits this many times longer
    retry_backoff_max: str = "3600s"  # no retry after this long
    timeout_s: int = 6 * 3600  # per-task timeout
    cpu_request: str = "4"
    memory_request: str = "16Gi"
    # Kubernetes secrets given to the register task as environment variables
    # (secret key -> variable; optional: a missing secret or key leaves the variable unset).
    mlflow_secret: Optional[str] = "pxpo-mlflow"  # MLflow server credentials
    mlflow_secret_env: dict[str, str] = field(default_factory=lambda: {
        k: k for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
    })
    artifact_secret: Optional[str] = "pxpo-artifact-store"  # the MLflow artifact store (S3 / MinIO)
    artifact_secret_env: dict[str, str] = field(default_factory=lambda: {
        k: k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL")
    })
    # Training at scale (docs/distributed.md): data-parallel processes per train pod (torchrun; 0: one per
    # GPU of the pod, which requests accelerator_limit GPUs), and train_nodes > 1: the train task creates a
    # Kubeflow Trainer TrainJob (runtime train_runtime) of train_nodes nodes x accelerator_limit GPUs that
    # shares the ReadWriteMany PVC train_shared_pvc (trajectories in; checkpoints, state, policy out).
    # train_trainer_api: the cluster's Kubeflow Trainer release, which names the TrainJob's pod-override
    # field: "v2.3" / "v2.2" (runtimePatches) or "v2.1" (podTemplateOverrides); an API server prunes the other.
    train_processes_per_node: int = 1
    train_nodes: int = 1
    train_shared_pvc: Optional[str] = None
    train_shared_mount: str = "/pxpo-shared"
    train_namespace: str = "kubeflow"
    train_runtime: str = "torch-distributed"
    train_trainer_api: str = "v2.3"
    ttl_s: Optional[int] = 7 * 24 * 3600  # keep a finished run's workflow (and its pods' logs) this long
    deadline_s: Optional[int] = 3 * 24 * 3600  # a run still going after this long is stopped


def trainjob_settings(o: PipelineOptions) -> dict:
    """What the train component needs to create the multi-node TrainJob (``pxpo.kubeflow.trainjob``)."""
    from pxpo.errors import PxpoInputError
    from pxpo.kubeflow.container_images import image_ref
    from pxpo.kubeflow.trainjob import TRAINER_APIS

    if not o.train_shared_pvc:
        raise PxpoInputError("PipelineOptions.train_nodes", f"{o.train_nodes} nodes need a volume every node sees", "set train_shared_pvc to a ReadWriteMany PVC")
    if o.train_trainer_api not in TRAINER_APIS:
        raise PxpoInputError("PipelineOptions.train_trainer_api", f"{o.train_trainer_api!r} is not a Kubeflow Trainer release pxpo writes TrainJobs for",
                             f"use one of {', '.join(sorted(TRAINER_APIS))} (the installed one: the image tag of the Trainer controller manager)")
    return {
        "num_nodes": o.train_nodes, "gpus_per_node": o.accelerator_limit, "accelerator_type": o.accelerator_type,
        "pvc": o.train_shared_pvc, "mount_path": o.train_shared_mount, "namespace": o.train_namespace,
        "runtime": o.train_runtime, "image": image_ref("cuda"), "cpu": o.cpu_request, "memory": o.memory_request,
        "shm_size": o.shm_size or "8Gi", "node_selector": dict(o.node_selector), "tolerations": list(o.tolerations),
        "trainer_api": o.train_trainer_api,
    }


def _train_task(o: PipelineOptions, **kw):
    """The train task: one pod (``train_processes_per_node`` processes), or a TrainJob of ``train_nodes`` nodes."""
    import json

    if o.train_nodes > 1:
        task = train(**kw, trainjob=json.dumps(trainjob_settings(o), sort_keys=True), run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        kubernetes.mount_pvc(task, pvc_name=o.train_shared_pvc, mount_path=o.train_shared_mount)
        _retry(task, o)
        kubernetes.set_timeout(task, o.timeout_s)
        return task.set_cpu_request("1").set_memory_request("4Gi")  # it copies files and waits: the nodes train
    if o.train_processes_per_node != 1:
        kw["processes_per_node"] = o.train_processes_per_node
    return _gpu_task(train(**kw), o)


def _gpu_task(task, o: PipelineOptions):
    if o.gpu:
        task.set_accelerator_type(o.accelerator_type).set_accelerator_limit(o.accelerator_limit)
        for key, value in o.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for t in o.tolerations:
            kubernetes.add_toleration(task, **t)
    task.set_cpu_request(o.cpu_request).set_memory_request(o.memory_request)
    _retry(task, o)
    kubernetes.set_timeout(task, o.timeout_s)
    if o.shm_size:
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=o.shm_size)
    _cache(task, o)
    return task


def _retry(task, o: PipelineOptions):
    if o.retries:
        task.set_retry(
            num_retries=o.retries, backoff_duration=o.retry_backoff,
            backoff_factor=o.retry_backoff_factor, backoff_max_duration=o.retry_backoff_max,
        )
    return task


def _secrets(task, o: PipelineOptions):
    for name, env in ((o.mlflow_secret, o.mlflow_secret_env), (o.artifact_secret, o.artifact_secret_env)):
        if name and env:
            kubernetes.use_secret_as_env(task, secret_name=name, secret_key_to_env=dict(env), optional=True)
    return task


def _cache(task, o: PipelineOptions):
    if o.cache_pvc:
        kubernetes.mount_pvc(task, pvc_name=o.cache_pvc, mount_path="/cache")
        task.set_env_variable("HF_HOME", "/cache/huggingface")
    return task


def build_pipeline(o: Optional[PipelineOptions] = None):
    """The pipeline function for these options (rounds unrolled)."""
    o = o or PipelineOptions()

    config = dsl.PipelineConfig(ttl_seconds_after_finished=o.ttl_s, active_deadline_seconds=o.deadline_s)

    @dsl.pipeline(
        name="pxpo",
        description="Pixel-wise RL fine-tuning of a text-to-image diffusion model (PXPO / DDPO)",
        pipeline_config=config,
    )
    def pxpo_pipeline(
        prompts_uri: str,
        params_seed: str,
        params_model: str,
        params_prompts: str,
        params_sample: str,
        params_reward: str,
        params_train: str,
        params_prepare: str,
        params_evaluate: str,
        params_register: str,
        model_ref: str = "embedded",
        mlflow_tracking_uri: str = "",
    ) -> Artifact:
        sections = {
            "seed": params_seed, "model": params_model, "prompts": params_prompts, "sample": params_sample,
            "reward": params_reward, "train": params_train, "prepare": params_prepare,
            "evaluate": params_evaluate, "register": params_register,
        }
        if set(sections) != set(PIPELINE_SECTIONS):
            raise TypeError(f"the pipeline's params_* parameters {sorted(sections)} do not match STAGE_SECTIONS {sorted(PIPELINE_SECTIONS)}")

        def params(stage):
            return section_params(stage, sections)

        base = _cache(base_model(model_ref=model_ref), o).set_display_name("base model")
        data = prepare(**params("prepare"), prompts_uri=prompts_uri).set_display_name("prepare prompts")
        policy_task = None
        label_task = None
        for r in range(o.rounds):
            kw = dict(round_index=r * o.epochs_per_round, base_model=base.outputs["model"], dataset=data.outputs["dataset"])
            if policy_task is not None:
                kw["policy"] = policy_task.outputs["policy"]
            s = _gpu_task(sample(**params("sample"), **kw), o).set_display_name(f"sample round {r}")
            label_task = label(**params("label"), trajectories=s.outputs["trajectories"]).set_display_name(f"label round {r}")
            tkw = dict(
                epochs=o.epochs_per_round,
                base_model=base.outputs["model"],
                dataset=data.outputs["dataset"],
                labelled=label_task.outputs["labelled"],
            )
            if policy_task is not None:
                tkw["state"] = policy_task.outputs["policy"]
            policy_task = _train_task(o, **params("train"), **tkw).set_display_name(f"train round {r}")
        ev = _gpu_task(
            evaluate(**params("evaluate"), base_model=base.outputs["model"], dataset=data.outputs["dataset"], policy=policy_task.outputs["policy"]),
            o,
        ).set_display_name("evaluate")
        reg = register(
            **params("register"),
            mlflow_tracking_uri=mlflow_tracking_uri,
            base_model=base.outputs["model"],
            dataset=data.outputs["dataset"],
            policy=policy_task.outputs["policy"],
            evaluation=ev.outputs["evaluation"],
            prompts_validation=data.outputs["validation"],
            labels_validation=label_task.outputs["validation"],
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        ).set_display_name("register").set_caching_options(False)  # every run registers (and gets its own run id)
        _secrets(_retry(reg, o), o)
        return reg.outputs["decision"]

    return pxpo_pipeline
