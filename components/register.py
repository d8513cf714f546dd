"""KFP component: MLflow registration with a gated champion alias (``pxpo register``)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from pxpo.kubeflow.container_images import image_ref


@dsl.component(base_image=image_ref("cpu"), install_kfp_package=False)
def register(
    params_seed: str,
    params_model: str,
    params_prompts: str,
    params_sample: str,
    params_reward: str,
    params_train: str,
    params_prepare: str,
    params_evaluate: str,
    params_register: str,
    mlflow_tracking_uri: str,
    base_model: Input[Model],
    dataset: Input[Dataset],
    policy: Input[Model],
    evaluation: Input[Artifact],
    prompts_validation: Input[Artifact],
    labels_validation: Input[Artifact],
    decision: Output[Artifact],
    run_id: str = "",
    run_name: str = "",
):
    """Log the policy as a model version (alias challenger); promote to champion if it passes.

    ``dataset`` (the prepared prompts) is logged as the run's MLflow dataset inputs (lineage).

    ``run_id`` / ``run_name`` (the pipeline passes the KFP run's) become the
    MLflow run's ``kfp.run_id`` / ``kfp.run_name`` tags (``$KFP_RUN_ID``, ``$KFP_RUN_NAME``)."""
    from pxpo.kubeflow.launcher import model_ref_args, run_stage

    params = {  # every section: the MLflow run logs the whole config as the model version's provenance
        "seed": params_seed, "model": params_model, "prompts": params_prompts, "sample": params_sample,
        "reward": params_reward, "train": params_train, "prepare": params_prepare,
        "evaluate": params_evaluate, "register": params_register,
    }
    args = ["--policy", policy.path, "--eval", evaluation.path, "--out", decision.path,
            "--validation", prompts_validation.path, labels_validation.path]
    if mlflow_tracking_uri:
        args += ["--tracking-uri", mlflow_tracking_uri]
    env = {k: v for k, v in (("KFP_RUN_ID", run_id), ("KFP_RUN_NAME", run_name)) if v}
    run_stage(["register"], params, args, [*model_ref_args(base_model.path), f"prompts.source={dataset.path}"], env=env)
