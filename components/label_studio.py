"""KFP components: people label in Label Studio (``pxpo label-studio push`` / ``pull``).

A run cannot wait for people, so the human loop is two pipelines
(pipelines/human_in_the_loop.py): the first ends with ``label_studio_push``,
the second starts with ``label_studio_pull`` on the pushed trajectories.
The API token comes from the environment (a Kubernetes secret, ``label.token_env``).
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from pxpo.kubeflow.container_images import image_ref


@dsl.component(base_image=image_ref("cpu"), install_kfp_package=False)
def label_studio_push(params_label: str, params_reward: str, trajectories: Input[Dataset], handoff: Output[Artifact]):
    """Upload the samples to the Label Studio project; ``handoff`` records what the second pipeline needs."""
    import json

    from pxpo.kubeflow.launcher import run_stage

    run_stage(["label-studio", "push"], {"label": params_label, "reward": params_reward}, ["--trajectories", trajectories.path])
    with open(handoff.path, "w") as f:
        json.dump({"trajectories_uri": trajectories.uri, "next": "the pxpo-human-train pipeline with trajectories_uri"}, f)
    handoff.metadata["trajectories_uri"] = trajectories.uri


@dsl.component(base_image=image_ref("cpu"), install_kfp_package=False)
def label_studio_pull(params_label: str, trajectories: Input[Dataset], labelled: Output[Dataset], validation: Output[Artifact]):
    """Copy the trajectories and add the people's ``reward_maps.safetensors`` (validated by Great Expectations)."""
    from pxpo.kubeflow.launcher import run_stage

    run_stage(
        ["label-studio", "pull"], {"label": params_label},
        ["--trajectories", trajectories.path, "--out", labelled.path, "--validate", "--report", validation.path],
    )
