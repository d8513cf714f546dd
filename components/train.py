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
):
    """Train ``epochs`` epochs (the first on ``labelled``, the rest sampled online from
    ``dataset``'s training prompts), continuing from ``state`` if given."""
    from pxpo.kubeflow.launcher import log_json_metrics, model_ref_args, run_stage

    params = {
        "seed": params_seed, "model": params_model, "prompts": params_prompts,
        "sample": params_sample, "reward": params_reward, "train": params_train,
    }
    args = ["--trajectories", labelled.path, "--out", policy.path, "--rounds", str(int(epochs))]
    if state is not None:
        args += ["--state", state.path]
    run_stage(["train"], params, args, [*model_ref_args(base_model.path), f"prompts.source={dataset.path}"])
    log_json_metrics(metrics, policy.path + "/metrics.jsonl")
