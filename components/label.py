"""KFP component: reward-map labelling (``pxpo label``)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from pxpo.kubeflow.container_images import image_ref


@dsl.component(base_image=image_ref("cpu"), install_kfp_package=False)
def label(params_reward: str, trajectories: Input[Dataset], labelled: Output[Dataset], validation: Output[Artifact]):
    """Copy the trajectories and add ``reward_maps.safetensors`` (validated by Great Expectations)."""
    from pxpo.kubeflow.launcher import run_stage

    run_stage(
        ["label"], {"reward": params_reward},
        ["--trajectories", trajectories.path, "--out", labelled.path, "--validate", "--report", validation.path],
    )
