"""KFP component: PXPO / DDPO training through Accelerate (``pxpo train``)."""

from typing import Optional

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from pxpo.images import image_ref


@dsl.component(base_image=image_ref("cuda"), install_kfp_package=False)
def train(
    params: str,
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
    from pxpo.kfp_stages import log_json_metrics, model_ref_args, run_stage

    args = ["--trajectories", labelled.path, "--out", policy.path, "--rounds", str(int(epochs))]
    if state is not None:
        args += ["--state", state.path]
    run_stage(["train"], params, args, [*model_ref_args(base_model.path), f"prompts.source={dataset.path}"])
    log_json_metrics(metrics, policy.path + "/metrics.jsonl")
