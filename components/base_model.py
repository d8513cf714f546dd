"""KFP component: the base model (build the embedded default, or reference a user model)."""

from kfp import dsl
from kfp.dsl import Model, Output

from pxpo.images import image_ref


@dsl.component(base_image=image_ref("cpu"), install_kfp_package=False)
def base_model(model_ref: str, model: Output[Model]):
    """``embedded``: run ``pxpo base build`` (cache this task); ``embedded-lcm``: build it and
    distil a few-step consistency model from it; otherwise record ``model_ref`` (a hub id or
    a path on a mounted volume) as the model to fine-tune."""
    from pxpo.kfp_stages import write_model_ref

    if model_ref in ("embedded", "embedded-lcm"):
        import tempfile

        from pxpo.cli import main

        teacher = model.path if model_ref == "embedded" else tempfile.mkdtemp() + "/base"
        if main(["base", "build", "--quiet", "--out", teacher]) != 0:
            raise RuntimeError("pxpo base build failed")
        if model_ref == "embedded-lcm" and main(["base", "distill-lcm", "--quiet", "--teacher", teacher, "--out", model.path]) != 0:
            raise RuntimeError("pxpo base distill-lcm failed")
    else:
        write_model_ref(model.path, model_ref)
    model.metadata["model_ref"] = model_ref
