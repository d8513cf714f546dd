"""KFP component: PXPO / DDPO training through Accelerate (``pxpo train``)."""

from typing import Optional

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from pxpo.kubeflow.container_images import image_ref


@dsl.component(base_image=image_ref("cuda"), install_kfp_package=False)
def train(
    params_seed: str,
    params_model: str,
    params_prompts: str,
    params_sample: str,
    params_reward: str,
    params_train: str,
    epochs: int,
    base_model: Input[Model],
    dataset: Input[Dataset],
    labelled: Input[Dataset],
    policy: Output[Model],
    metrics: Output[Metrics],
    state: Optional[Input[Model]] = None,
    processes_per_node: int = 1,
    trainjob: str = "",
    run_id: str = "",
):
    """Train ``epochs`` epochs (the first on ``labelled``, the rest sampled online from
    ``dataset``'s training prompts), continuing from ``state`` if given.

    ``processes_per_node``: data-parallel processes in this pod (torchrun; 0 = one per GPU).
    ``trainjob``: JSON settings of a multi-node Kubeflow Trainer TrainJob (``PipelineOptions.train_nodes > 1``):
    the inputs go to the shared PVC, the TrainJob trains, the policy comes back.
    """
    import json

    from pxpo.kubeflow.launcher import log_json_metrics, model_ref_args, run_stage
    from pxpo.kubeflow.trainjob import local_launcher, run_multinode_train

    params = {
        "seed": params_seed, "model": params_model, "prompts": params_prompts,
        "sample": params_sample, "reward": params_reward, "train": params_train,
    }
    if trainjob:
        inputs = {"trajectories": labelled.path, "dataset": dataset.path, "state": state.path if state is not None else None}
        overrides = [*model_ref_args(base_model.path)]
        run_multinode_train(json.loads(trainjob), params, inputs, policy.path, overrides, run_id=f"{run_id}-{int(epochs)}", rounds=int(epochs))
        log_json_metrics(metrics, policy.path + "/metrics.jsonl")
        return
    args = ["--trajectories", labelled.path, "--out", policy.path, "--rounds", str(int(epochs))]
    if state is not None:
        args += ["--state", state.path]
    launcher = local_launcher(int(processes_per_node))
    run_stage(["train"], params, args, [*model_ref_args(base_model.path), f"prompts.source={dataset.path}"], launcher=launcher)
    log_json_metrics(metrics, policy.path + "/metrics.jsonl")
