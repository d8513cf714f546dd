"""``pxpo``: the one command-line seam every stage (local, DVC, KFP) calls.

    pxpo base build [--out models/base]        build + pretrain the embedded default
    pxpo run    [--params params.yaml] [--processes N] [--tracking-uri URI] [k=v ...]   online loop: sample -> label -> train, N epochs
    pxpo prepare --out DIR [--input FILE]      prompt dataset: dedupe, split, validate (GE)
    pxpo sample --out DIR [--policy DIR] [--epoch K] [k=v ...]   write a trajectory artifact
    pxpo label  --trajectories DIR [k=v ...]   write reward_maps.safetensors beside it
    pxpo label-studio push|pull, pxpo dense-reward train   people's and learned maps (docs/labelling.md)
    pxpo train  --trajectories DIR --out DIR [--state DIR] [--rounds R]   train (first epoch on DIR)
    pxpo evaluate --policy DIR --out DIR       held-out prompts, policy vs base
    pxpo register --policy DIR --eval DIR      MLflow model version, gated champion alias
    pxpo labellers [k=v ...]                   list reward labellers and where each comes from
    pxpo pairs import --images DIR --prefs FILE --out DIR   a team's image pairs -> trajectories for diffusion_dpo

Overrides are ``section.field=value`` (YAML values), applied over params.yaml.
Bad input exits with status 2 and one message naming the input and the fix.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..quiet import silence_uninformative_warnings
from pathlib import Path

from ..errors import PxpoInputError


# Command -> the module that implements it (DVC's deps test reads this: a stage's
# code is this module and what it imports).
COMMANDS = {
    "base build": "pxpo.stages.base",
    "base distill-lcm": "pxpo.stages.base",
    "base random": "pxpo.stages.base",
    "prepare": "pxpo.stages.prepare",
    "sample": "pxpo.stages.sample",
    "label": "pxpo.stages.label",
    "label-studio push": "pxpo.stages.label_studio", "label-studio pull": "pxpo.stages.label_studio",
    "dense-reward train": "pxpo.stages.dense_reward",
    "train": "pxpo.stages.train",
    "run": "pxpo.stages.online",
    "evaluate": "pxpo.stages.evaluate",
    "register": "pxpo.stages.register",
    "pipeline": "pxpo.kubeflow",
    "labellers": "pxpo.labellers",
    "pairs import": "pxpo.stages.pairs",
}


def build_parser() -> argparse.ArgumentParser:
    from .commands import config_of, cmd_base_build, cmd_base_lcm, cmd_base_random, cmd_run, cmd_sample, cmd_label, cmd_train, cmd_prepare, cmd_evaluate, cmd_register, cmd_pipeline, cmd_labellers
    p = argparse.ArgumentParser(prog="pxpo", description="Pixel-wise RL fine-tuning of text-to-image diffusion models.")
    p.add_argument("--version", action="version", version=f"pxpo {__import__('pxpo').__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("--params", default=None, help="params.yaml (default: ./params.yaml if present)")
        sp.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.epochs=5")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.add_argument(
            "--sections", default=None,
            help="comma-separated params sections this task was given (Kubeflow per-task params); reading any other is an error",
        )

    base = sub.add_parser("base", help="the embedded default model")
    bsub = base.add_subparsers(dest="base_command", required=True)
    b = bsub.add_parser("build", help="build and pretrain the tiny default pipeline (a few CPU minutes)")
    b.add_argument("--arch", default="sd", help="sd (UNet + DDIM, default) or sd3 (SD3 transformer + flow matching)")
    b.add_argument("--out", default=None, help="default models/base (sd) or models/sd3 (sd3)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--vae-steps", type=int, default=None)
    b.add_argument("--unet-steps", type=int, default=None, help="denoiser pretraining steps (the SD3 transformer's with --arch sd3)")
    b.add_argument("--text-lr-mult", type=float, default=None, help="text encoder lr = UNet lr x this")
    b.add_argument("--force", action="store_true", help="rebuild even if the directory exists")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(fn=cmd_base_build)
    bl = bsub.add_parser("distill-lcm", help="distil the default into a few-step latent consistency model (a few CPU minutes)")
    bl.add_argument("--teacher", default="models/base")
    bl.add_argument("--out", default="models/lcm")
    bl.add_argument("--seed", type=int, default=0)
    bl.add_argument("--steps", type=int, default=None, help="distillation steps (default 1000)")
    bl.add_argument("--force", action="store_true")
    bl.add_argument("--quiet", action="store_true")
    bl.set_defaults(fn=cmd_base_lcm)
    br = bsub.add_parser("random", help="save a RANDOM-weight pipeline with a published architecture's shapes (GPU timing fixture)")
    br.add_argument("--arch", default="sd15", help="architecture whose component configs to use (sd15, sd35m)")
    br.add_argument("--out", required=True)
    br.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    br.add_argument("--seed", type=int, default=0)
    br.add_argument("--force", action="store_true")
    br.set_defaults(fn=cmd_base_random)

    r = sub.add_parser("run", help="online loop: sample -> label -> train for train.epochs epochs")
    with_config(r)
    r.add_argument("--no-resume", action="store_true", help="start fresh even if checkpoints exist")
    r.add_argument("--processes", type=int, default=None, help="data-parallel processes on this node (torchrun): the same result as one")
    r.add_argument("--tracking-uri", default=None, help="also log live to MLflow here (watch with `mlflow ui`); default: $MLFLOW_TRACKING_URI, else none")
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("sample", help="sample trajectories with per-element log-probs")
    with_config(s)
    s.add_argument("--out", required=True, help="trajectory directory to write")
    s.add_argument("--policy", default=None, help="a `pxpo train`/`pxpo run` output (or LoRA dir) to sample from; default: the base model")
    s.add_argument("--epoch", type=int, default=None, help="round index for prompts and noise seeds (default: the policy's completed rounds, else 0)")
    s.add_argument("--validate", action="store_true", help="run the Great Expectations trajectory suite before writing")
    s.add_argument("--report", default=None, help="validation report path (default: <out>.validation.json)")
    s.set_defaults(fn=cmd_sample)

    lab = sub.add_parser("label", help="write reward maps beside a trajectory directory")
    with_config(lab)
    lab.add_argument("--trajectories", required=True)
    lab.add_argument("--out", default=None, help="write a labelled copy here instead of labelling in place")
    lab.add_argument("--validate", action="store_true", help="run the Great Expectations reward-map suite before writing")
    lab.add_argument("--report", default=None, help="validation report path (default: <trajectories>/reward_maps.validation.json)")
    lab.set_defaults(fn=cmd_label)

    from .feedback import add_feedback_parsers
    add_feedback_parsers(sub, with_config, config_of)  # label-studio push|pull, dense-reward train
    from .pairs import add_pairs_parsers
    add_pairs_parsers(sub, with_config, config_of)  # pairs import

    t = sub.add_parser("train", help="one training pass on labelled trajectories")
    with_config(t)
    t.add_argument("--trajectories", required=True)
    t.add_argument("--out", required=True, help="output: lora/ (or model/), state/, train_metrics.json")
    t.add_argument("--state", default=None, help="a previous `pxpo train --out` to continue from")
    t.add_argument("--rounds", type=int, default=None, help="epochs to run: the first on --trajectories, the rest sampled online (default: train.epochs)")
    t.add_argument("--history", default=None, help="also write per-epoch metrics as CSV here (DVC plots)")
    t.set_defaults(fn=cmd_train)

    pr = sub.add_parser("prepare", help="prompt dataset: dedupe, split, validate, write a versioned dataset")
    with_config(pr)
    pr.add_argument("--input", default=None, help="raw prompts (.csv/.jsonl/.txt; default: prepare.input)")
    pr.add_argument("--out", required=True, help="dataset directory to write")
    pr.add_argument("--report", default=None, help="validation report path (default: <out>.validation.json)")
    pr.add_argument("--drop-empty", action="store_true", help="drop rows with an empty prompt instead of failing validation")
    pr.set_defaults(fn=cmd_prepare)

    ev = sub.add_parser("evaluate", help="held-out prompts: policy vs base, reward maps, drift, grids")
    with_config(ev)
    ev.add_argument("--policy", default=None, help="`pxpo train`/`pxpo run` output to evaluate (default: base only)")
    ev.add_argument("--prompts", default=None, help="prepared dataset dir (held-out split) or prompt file; default: prompts.source")
    ev.add_argument("--out", required=True)
    ev.add_argument("--metrics", default=None, help="also write the numeric metrics as flat JSON here (DVC metrics)")
    ev.set_defaults(fn=cmd_evaluate)

    rg = sub.add_parser("register", help="log the policy to MLflow as challenger; promote to champion if it passes the gate")
    with_config(rg)
    rg.add_argument("--policy", required=True)
    rg.add_argument("--eval", required=True, help="`pxpo evaluate` output directory")
    rg.add_argument("--validation", nargs="*", default=[], help="validation report JSONs that must all have passed")
    rg.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite under --mlflow-root")
    rg.add_argument("--mlflow-root", default="mlflow", help="local store directory for the default sqlite registry")
    rg.add_argument("--out", default=None, help="write the decision JSON here")
    rg.set_defaults(fn=cmd_register)

    pl = sub.add_parser("pipeline", help="Kubeflow pipeline: compile, run locally with kfp.local, submit")
    psub = pl.add_subparsers(dest="pipeline_command", required=True)
    pcomp = psub.add_parser("compile", help="write the pipeline IR YAML")
    with_config(pcomp)
    pcomp.add_argument("--out", default="pipelines/pxpo_pipeline.yaml")
    pcomp.add_argument("--rounds", type=int, default=None, help="unrolled rounds (default: pipeline.rounds)")
    prun = psub.add_parser("run", help="run the whole DAG on this machine (kfp.local)")
    with_config(prun)
    prun.add_argument("--local", action="store_true", required=True)
    prun.add_argument("--rounds", type=int, default=None)
    prun.add_argument("--workdir", default="runs/kfp-local")
    prun.add_argument("--prompts-uri", default=None, help="raw prompt file (default: prepare.input)")
    prun.add_argument("--model-ref", default=None, help="'embedded', a model dir or hub id (default: model.path if built, else embedded)")
    prun.add_argument("--tracking-uri", default=None)
    prun.add_argument("--verbose", action="store_true", help="stream every task's full log here (default: one line per task, logs in files)")
    psubm = psub.add_parser("submit", help="submit to a KFP endpoint (kfp.Client)")
    with_config(psubm)
    psubm.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kfp.example.com/pipeline")
    psubm.add_argument("--package", default="pipelines/pxpo_pipeline.yaml", help="compiled spec (compiled if missing)")
    psubm.add_argument("--prompts-uri", default=None, help="raw prompt file as the cluster sees it (PVC path)")
    psubm.add_argument("--model-ref", default=None, help="hub id or mounted path of the model to fine-tune")
    psubm.add_argument("--tracking-uri", default=None, help="remote MLflow (default: $MLFLOW_TRACKING_URI)")
    psubm.add_argument("--experiment", default="pxpo")
    psubm.add_argument("--run-name", default=None)
    for sp in (pcomp, prun, psubm):
        sp.set_defaults(fn=cmd_pipeline)

    ls = sub.add_parser("labellers", help="list reward labellers and where each comes from (built-in, plugin, module:function)")
    with_config(ls)
    ls.set_defaults(fn=cmd_labellers)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    silence_uninformative_warnings()  # transformers' torchvision fallback notes (pxpo.quiet)
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):  # also the model-loading bars of transformers / huggingface_hub / diffusers
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from ..timing import timed

    name = " ".join(a for a in (args.command, getattr(args, "base_command", None), getattr(args, "pipeline_command", None), getattr(args, "pairs_command", None)) if a)
    if args.command in ("prepare", "evaluate") or getattr(args, "validate", False):
        # Great Expectations takes ~5 s to import: let a worker process do it while the stage loads and computes
        from ..validation import start_worker

        start_worker()
    try:
        with timed(f"stage:{name}"):
            return args.fn(args)
    except PxpoInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
