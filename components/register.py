"""KFP component: MLflow registration with a gated champion alias (``pxpo register``)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from pxpo.images import image_ref


@dsl.component(base_image=image_ref("cpu"), install_kfp_package=False)
def register(
    params: str,
    mlflow_tracking_uri: str,
    base_model: Input[Model],
    policy: Input[Model],
    evaluation: Input[Artifact],
    prompts_validation: Input[Artifact],
    labels_validation: Input[Artifact],
    decision: Output[Artifact],
):
    """Log the policy as a model version (alias challenger); promote to champion if it passes."""
    from pxpo.kfp_stages import model_ref_args, run_stage

    args = ["--policy", policy.path, "--eval", evaluation.path, "--out", decision.path,
            "--validation", prompts_validation.path, labels_validation.path]
    if mlflow_tracking_uri:
        args += ["--tracking-uri", mlflow_tracking_uri]
    run_stage(["register"], params, args, model_ref_args(base_model.path))
