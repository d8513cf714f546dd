"""KFP component: held-out evaluation (``pxpo evaluate``)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from pxpo.kubeflow.container_images import image_ref


@dsl.component(base_image=image_ref("cuda"), install_kfp_package=False)
def evaluate(
    params_model: str,
    params_prompts: str,
    params_sample: str,
    params_reward: str,
    params_evaluate: str,
    base_model: Input[Model],
    dataset: Input[Dataset],
    policy: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
):
    """Policy vs base on held-out prompts: rewards, reward maps, drift, grids."""
    from pxpo.kubeflow.launcher import log_json_metrics, model_ref_args, run_stage

    params = {
        "model": params_model, "prompts": params_prompts, "sample": params_sample,
        "reward": params_reward, "evaluate": params_evaluate,
    }
    run_stage(
        ["evaluate"], params, ["--policy", policy.path, "--prompts", dataset.path, "--out", evaluation.path],
        model_ref_args(base_model.path),
    )
    log_json_metrics(metrics, evaluation.path + "/metrics.json")
