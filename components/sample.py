"""KFP component: GPU sampling with per-element log-probs (``pxpo sample``)."""

from typing import Optional

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from pxpo.kubeflow.container_images import image_ref


@dsl.component(base_image=image_ref("cuda"), install_kfp_package=False)
def sample(
    params_seed: str,
    params_model: str,
    params_prompts: str,
    params_sample: str,
    round_index: int,
    base_model: Input[Model],
    dataset: Input[Dataset],
    trajectories: Output[Dataset],
    policy: Optional[Input[Model]] = None,
):
    """Roll out the policy (the base model in round 0) on the training prompts."""
    from pxpo.kubeflow.launcher import model_ref_args, run_stage

    params = {"seed": params_seed, "model": params_model, "prompts": params_prompts, "sample": params_sample}
    args = ["--out", trajectories.path, "--epoch", str(int(round_index)), "--validate", "--report", trajectories.path + ".validation.json"]
    if policy is not None:
        args += ["--policy", policy.path]
    run_stage(["sample"], params, args, [*model_ref_args(base_model.path), f"prompts.source={dataset.path}"])
    trajectories.metadata["round"] = int(round_index)
