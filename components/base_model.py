"""KFP component: the base model (build the embedded default, or reference a user model)."""

from kfp import dsl
from kfp.dsl import Model, Output

from pxpo.kubeflow.container_images import image_ref


@dsl.component(base_image=image_ref("cpu"), install_kfp_package=False)
def base_model(model_ref: str, model: Output[Model]):
    """``embedded``: run ``pxpo base build`` (cache this task); ``embedded-lcm``: build it and
    distil a few-step consistency model from it; otherwise record ``model_ref`` (a hub id or
    a path on a mounted volume) as the model to fine-tune."""
    from pxpo.kubeflow.launcher import run_stage, write_model_ref

    if model_ref in ("embedded", "embedded-lcm"):
        import tempfile

        teacher = model.path if model_ref == "embedded" else tempfile.mkdtemp() + "/base"
        run_stage(["base", "build"], None, ["--out", teacher])
        if model_ref == "embedded-lcm":
            run_stage(["base", "distill-lcm"], None, ["--teacher", teacher, "--out", model.path])
    else:
        write_model_ref(model.path, model_ref)
    model.metadata["model_ref"] = model_ref
