"""The pxpo Kubeflow pipeline: prepare -> base -> R x (sample -> label -> train) -> evaluate -> register.

``build_pipeline(options)`` returns a ``@dsl.pipeline`` function with the
rounds unrolled (R is a compile-time option) and the Kubernetes settings of
:class:`PipelineOptions` applied to the tasks. ``pxpo pipeline compile`` writes
its IR YAML; ``pxpo pipeline run --local`` runs it with ``kfp.local``;
``pxpo pipeline submit`` sends it to a KFP endpoint.
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
    retries: int = 2  # retries of GPU tasks (preemptible nodes)
    timeout_s: int = 6 * 3600  # per-task timeout
    cpu_request: str = "4"
    memory_request: str = "16Gi"


def _gpu_task(task, o: PipelineOptions):
    if o.gpu:
        task.set_accelerator_type(o.accelerator_type).set_accelerator_limit(o.accelerator_limit)
        for key, value in o.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for t in o.tolerations:
            kubernetes.add_toleration(task, **t)
    task.set_cpu_request(o.cpu_request).set_memory_request(o.memory_request)
    task.set_retry(num_retries=o.retries)
    kubernetes.set_timeout(task, o.timeout_s)
    if o.shm_size:
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=o.shm_size)
    _cache(task, o)
    return task


def _cache(task, o: PipelineOptions):
    if o.cache_pvc:
        kubernetes.mount_pvc(task, pvc_name=o.cache_pvc, mount_path="/cache")
        task.set_env_variable("HF_HOME", "/cache/huggingface")
    return task


def build_pipeline(o: Optional[PipelineOptions] = None):
    """The pipeline function for these options (rounds unrolled)."""
    o = o or PipelineOptions()

    @dsl.pipeline(name="pxpo", description="Pixel-wise RL fine-tuning of a text-to-image diffusion model (PXPO / DDPO)")
    def pxpo_pipeline(params: str, prompts_uri: str, model_ref: str = "embedded", mlflow_tracking_uri: str = "") -> Artifact:
        base = _cache(base_model(model_ref=model_ref), o).set_display_name("base model")
        data = prepare(params=params, prompts_uri=prompts_uri).set_display_name("prepare prompts")
        policy_task = None
        label_task = None
        for r in range(o.rounds):
            kw = dict(params=params, round_index=r * o.epochs_per_round, base_model=base.outputs["model"], dataset=data.outputs["dataset"])
            if policy_task is not None:
                kw["policy"] = policy_task.outputs["policy"]
            s = _gpu_task(sample(**kw), o).set_display_name(f"sample round {r}")
            label_task = label(params=params, trajectories=s.outputs["trajectories"]).set_display_name(f"label round {r}")
            tkw = dict(
                params=params,
                epochs=o.epochs_per_round,
                base_model=base.outputs["model"],
                dataset=data.outputs["dataset"],
                labelled=label_task.outputs["labelled"],
            )
            if policy_task is not None:
                tkw["state"] = policy_task.outputs["policy"]
            policy_task = _gpu_task(train(**tkw), o).set_display_name(f"train round {r}")
        ev = _gpu_task(
            evaluate(params=params, base_model=base.outputs["model"], dataset=data.outputs["dataset"], policy=policy_task.outputs["policy"]), o
        ).set_display_name("evaluate")
        reg = register(
            params=params,
            mlflow_tracking_uri=mlflow_tracking_uri,
            base_model=base.outputs["model"],
            policy=policy_task.outputs["policy"],
            evaluation=ev.outputs["evaluation"],
            prompts_validation=data.outputs["validation"],
            labels_validation=label_task.outputs["validation"],
        ).set_display_name("register").set_caching_options(False)
        return reg.outputs["decision"]

    return pxpo_pipeline
