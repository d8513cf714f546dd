"""KFP component: held-out evaluation (``pxpo evaluate``)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from pxpo.images import image_ref


@dsl.component(base_image=image_ref("cuda"), install_kfp_package=False)
def evaluate(
    params: str,
    base_model: Input[Model],
    dataset: Input[Dataset],
    policy: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
):
    """Policy vs base on held-out prompts: rewards, reward maps, drift, grids."""
    from pxpo.kfp_stages import log_json_metrics, model_ref_args, run_stage

    run_stage(["evaluate"], params, ["--policy", policy.path, "--prompts", dataset.path, "--out", evaluation.path], model_ref_args(base_model.path))
    log_json_metrics(metrics, evaluation.path + "/metrics.json")
