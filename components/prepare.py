"""KFP component: prompt dataset preparation (``pxpo prepare``)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Output

from pxpo.kubeflow.container_images import image_ref


@dsl.component(base_image=image_ref("cpu"), install_kfp_package=False)
def prepare(params_prepare: str, prompts_uri: str, dataset: Output[Dataset], validation: Output[Artifact]):
    """Dedupe, split and validate the raw prompts at ``prompts_uri`` into a versioned dataset."""
    import json
    from pathlib import Path

    from pxpo.kubeflow.launcher import run_stage

    run_stage(["prepare"], {"prepare": params_prepare}, ["--input", prompts_uri, "--out", dataset.path, "--report", validation.path])
    info = json.loads((Path(dataset.path) / "dataset.json").read_text())
    dataset.metadata.update(version=info["version"], **info["counts"])
