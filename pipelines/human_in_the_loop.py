"""The human-in-the-loop variant (``label.mode: human``): two pipelines with people in between.

Kubeflow cannot wait for people inside a run, so the loop is cut where they work:

1. ``pxpo-human-push``: prepare -> base -> sample -> ``label-studio push``. It ends
   with the samples in the Label Studio project; its ``handoff`` artifact holds the
   trajectories' URI.
2. People paint the maps in Label Studio (docs/labelling.md).
3. ``pxpo-human-train``, run with ``trajectories_uri`` from the handoff: the
   trajectories imported -> ``label-studio pull`` -> train (one epoch, on the
   people's maps) -> evaluate -> register.

prepare and base are the same tasks with the same inputs in both, so the second
pipeline takes them from KFP's cache. Each task is wired only to the params
sections its stage reads (:data:`HUMAN_STAGE_SECTIONS` for the two Label
Studio stages, :data:`pxpo.kubeflow.launcher.STAGE_SECTIONS` for the others).
"""

from dataclasses import dataclass
from typing import Optional

from kfp import dsl, kubernetes
from kfp.dsl import Artifact, Dataset

from components.base_model import base_model
from components.evaluate import evaluate
from components.label_studio import label_studio_pull, label_studio_push
from components.prepare import prepare
from components.register import register
from components.sample import sample
from components.train import train
from pipelines.pxpo_pipeline import PipelineOptions, _cache, _gpu_task, _retry, _secrets
from pxpo.kubeflow.launcher import param_name, section_params

# The Label Studio stages' params sections (run_stage keys STAGE_SECTIONS by the first word only,
# and the main pipeline's parameters are exactly its STAGE_SECTIONS: these live here).
HUMAN_STAGE_SECTIONS = {"label-studio push": ("label", "reward"), "label-studio pull": ("label",)}
PUSH_SECTIONS = ("seed", "model", "prompts", "sample", "reward", "prepare", "label")
TRAIN_SECTIONS = ("seed", "model", "prompts", "sample", "reward", "train", "prepare", "evaluate", "register", "label")


@dataclass
class HumanPipelineOptions(PipelineOptions):
    """The main pipeline's options plus the Label Studio token's Kubernetes secret."""

    label_studio_secret: Optional[str] = "pxpo-label-studio"  # secret key LABEL_STUDIO_API_KEY -> env of push / pull


def options_like(o: PipelineOptions) -> HumanPipelineOptions:
    """The main pipeline's options (``pxpo pipeline compile`` builds them from params) as human-loop options."""
    import dataclasses

    return HumanPipelineOptions(**{f.name: getattr(o, f.name) for f in dataclasses.fields(PipelineOptions)})


def _label_studio_env(task, o: HumanPipelineOptions):
    if o.label_studio_secret:
        kubernetes.use_secret_as_env(
            task, secret_name=o.label_studio_secret, secret_key_to_env={"LABEL_STUDIO_API_KEY": "LABEL_STUDIO_API_KEY"}, optional=True
        )
    return _retry(task, o)


def _params(stage: str, sections: dict) -> dict:
    if stage in HUMAN_STAGE_SECTIONS:
        return {param_name(s): sections[s] for s in HUMAN_STAGE_SECTIONS[stage]}
    return section_params(stage, sections)


def build_push_pipeline(o: Optional[HumanPipelineOptions] = None):
    """Pipeline 1: sample with the base model and push the samples to Label Studio."""
    o = o or HumanPipelineOptions()

    @dsl.pipeline(name="pxpo-human-push", description="PXPO with people: sample, then push the images to Label Studio")
    def pxpo_human_push(
        prompts_uri: str,
        params_seed: str,
        params_model: str,
        params_prompts: str,
        params_sample: str,
        params_reward: str,
        params_prepare: str,
        params_label: str,
        model_ref: str = "embedded",
    ) -> Artifact:
        sections = {
            "seed": params_seed, "model": params_model, "prompts": params_prompts, "sample": params_sample,
            "reward": params_reward, "prepare": params_prepare, "label": params_label,
        }
        base = _cache(base_model(model_ref=model_ref), o).set_display_name("base model")
        data = prepare(**_params("prepare", sections), prompts_uri=prompts_uri).set_display_name("prepare prompts")
        s = _gpu_task(
            sample(**_params("sample", sections), round_index=0, base_model=base.outputs["model"], dataset=data.outputs["dataset"]), o
        ).set_display_name("sample")
        push = label_studio_push(**_params("label-studio push", sections), trajectories=s.outputs["trajectories"])
        push = _label_studio_env(push.set_display_name("push to Label Studio").set_caching_options(False), o)
        return push.outputs["handoff"]

    return pxpo_human_push


def build_train_pipeline(o: Optional[HumanPipelineOptions] = None):
    """Pipeline 2: pull the people's maps for the pushed trajectories, train, evaluate, register."""
    o = o or HumanPipelineOptions()

    @dsl.pipeline(name="pxpo-human-train", description="PXPO with people: pull the painted maps, train, evaluate, register")
    def pxpo_human_train(
        trajectories_uri: str,
        prompts_uri: str,
        params_seed: str,
        params_model: str,
        params_prompts: str,
        params_sample: str,
        params_reward: str,
        params_train: str,
        params_prepare: str,
        params_evaluate: str,
        params_register: str,
        params_label: str,
        model_ref: str = "embedded",
        mlflow_tracking_uri: str = "",
    ) -> Artifact:
        sections = {
            "seed": params_seed, "model": params_model, "prompts": params_prompts, "sample": params_sample,
            "reward": params_reward, "train": params_train, "prepare": params_prepare,
            "evaluate": params_evaluate, "register": params_register, "label": params_label,
        }
        base = _cache(base_model(model_ref=model_ref), o).set_display_name("base model")
        data = prepare(**_params("prepare", sections), prompts_uri=prompts_uri).set_display_name("prepare prompts")
        traj = dsl.importer(artifact_uri=trajectories_uri, artifact_class=Dataset, reimport=False).set_display_name("pushed trajectories")
        pull = label_studio_pull(**_params("label-studio pull", sections), trajectories=traj.output)
        pull = _label_studio_env(pull.set_display_name("pull from Label Studio").set_caching_options(False), o)
        policy = _gpu_task(
            train(**_params("train", sections), epochs=1, base_model=base.outputs["model"], dataset=data.outputs["dataset"],
                  labelled=pull.outputs["labelled"]),
            o,
        ).set_display_name("train on the painted maps")
        ev = _gpu_task(
            evaluate(**_params("evaluate", sections), base_model=base.outputs["model"], dataset=data.outputs["dataset"],
                     policy=policy.outputs["policy"]),
            o,
        ).set_display_name("evaluate")
        reg = register(
            **_params("register", sections), mlflow_tracking_uri=mlflow_tracking_uri, base_model=base.outputs["model"],
            dataset=data.outputs["dataset"], policy=policy.outputs["policy"], evaluation=ev.outputs["evaluation"],
            prompts_validation=data.outputs["validation"], labels_validation=pull.outputs["validation"],
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        ).set_display_name("register").set_caching_options(False)
        _secrets(_retry(reg, o), o)
        return reg.outputs["decision"]

    return pxpo_human_train


def compile_human_pipelines(out_dir, o: Optional[HumanPipelineOptions] = None) -> tuple:
    """Write ``pxpo_human_push.yaml`` and ``pxpo_human_train.yaml`` into ``out_dir``; returns both paths."""
    from pathlib import Path

    from kfp import compiler

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / "pxpo_human_push.yaml", out / "pxpo_human_train.yaml")
    compiler.Compiler().compile(build_push_pipeline(o), str(paths[0]))
    compiler.Compiler().compile(build_train_pipeline(o), str(paths[1]))
    return paths
