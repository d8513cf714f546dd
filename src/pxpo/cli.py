"""``pxpo``: the one command-line seam every stage (local, DVC, KFP) calls.

    pxpo base build [--out models/base]        build + pretrain the embedded default
    pxpo run    [--params params.yaml] [k=v ...]   online loop: sample -> label -> train, N epochs
    pxpo prepare --out DIR [--input FILE]      prompt dataset: dedupe, split, validate (GE)
    pxpo sample --out DIR [--policy DIR] [--epoch K] [k=v ...]   write a trajectory artifact
    pxpo label  --trajectories DIR [k=v ...]   write reward_maps.safetensors beside it
    pxpo train  --trajectories DIR --out DIR [--state DIR] [--rounds R]   train (first epoch on DIR)
    pxpo evaluate --policy DIR --out DIR       held-out prompts, policy vs base
    pxpo register --policy DIR --eval DIR      MLflow model version, gated champion alias
    pxpo labellers                             list reward labellers

Overrides are ``section.field=value`` (YAML values), applied over params.yaml.
Bad input exits with status 2 and one message naming the input and the fix.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import PxpoInputError


def _config(args):
    from .config import load_config

    params = args.params
    if params is None and Path("params.yaml").exists():
        params = "params.yaml"
    return load_config(params, args.overrides)


def cmd_base_build(args) -> int:
    from .base_model import BaseModelSpec, build_base

    out = Path(args.out)
    if (out / "model_index.json").exists() and not args.force:
        print(f"{out} exists (use --force to rebuild)")
        return 0
    spec = BaseModelSpec(seed=args.seed)
    if args.vae_steps is not None:
        spec.vae_steps = args.vae_steps
    if args.unet_steps is not None:
        spec.unet_steps = args.unet_steps
    if args.text_lr_mult is not None:
        spec.text_lr_mult = args.text_lr_mult
    stats = build_base(out, spec, progress=not args.quiet)
    print(
        f"built {out}: prompt-following accuracy {stats['prompt_following_accuracy']:.2f} "
        f"(digit classifier on 80 samples), {stats['total_seconds']:.0f}s; grid {out / 'samples.png'}"
    )
    return 0


def cmd_base_lcm(args) -> int:
    from .base_model import LCMSpec, build_lcm

    out = Path(args.out)
    if (out / "model_index.json").exists() and not args.force:
        print(f"{out} exists (use --force to rebuild)")
        return 0
    teacher = Path(args.teacher)
    if not (teacher / "model_index.json").is_file():
        raise PxpoInputError(f"--teacher {teacher}", "not a diffusers pipeline directory", "run `pxpo base build` first")
    spec = LCMSpec(seed=args.seed)
    if args.steps is not None:
        spec.steps = args.steps
    stats = build_lcm(teacher, out, spec, progress=not args.quiet)
    print(
        f"distilled {out}: prompt-following accuracy "
        + ", ".join(f"{k} steps {stats[f'prompt_following_accuracy_{k}_steps']:.2f}" for k in (2, 4, 8))
        + f"; {stats['total_seconds']:.0f}s; grid {out / 'samples.png'}"
    )
    return 0


def cmd_run(args) -> int:
    from .tracking import JsonlTracker
    from .train import run

    cfg = _config(args)
    tracker = JsonlTracker(Path(cfg.output_dir))
    summary = run(cfg, tracker, progress=not args.quiet, resume=not args.no_resume)
    if "reward_first" in summary:
        print(
            f"reward {summary['reward_first']:.4f} -> {summary['reward_last']:.4f} "
            f"over {summary['completed_epochs']} epochs; curve {Path(cfg.output_dir) / 'reward_curve.png'}"
        )
    return 0


def cmd_sample(args) -> int:
    from .models import load_configured_pipeline, load_policy_into
    from .prompts import draw_prompts, load_weighted_prompts
    from .train import sample_seed, sample_trajectories
    from .trajectories import save_trajectories

    cfg = _config(args)
    pipe = load_configured_pipeline(cfg)
    load_policy_into(pipe, args.policy)
    n = cfg.sample.batch_size * cfg.sample.num_batches
    epoch = args.epoch
    if epoch is None:  # continue the round numbering of the policy's training
        rj = Path(args.policy or "") / "pxpo_round.json"
        epoch = json.loads(rj.read_text())["completed_rounds"] if args.policy and rj.is_file() else 0
    all_prompts, weights = load_weighted_prompts(cfg.prompts.source)
    prompts = draw_prompts(all_prompts, n, sample_seed(cfg.seed, epoch, 0, 0), weights)
    seeds = [sample_seed(cfg.seed, epoch, 0, i) for i in range(n)]
    traj = sample_trajectories(pipe, cfg, prompts, seeds, progress=not args.quiet)
    traj.meta["policy"] = args.policy
    traj.meta["epoch"] = epoch
    if args.validate:
        from .validation import check, validate_trajectories

        report = validate_trajectories(traj.latents, traj.log_probs, traj.timesteps, num_samples=n)
        check(report, _report_path(args, Path(args.out)))
    save_trajectories(traj, Path(args.out))
    print(f"wrote {n} trajectories to {args.out}")
    return 0


def cmd_label(args) -> int:
    from .core.rewards import make_labeller
    from .train import label_images
    from .trajectories import MAPS, load_trajectories, save_reward_maps

    cfg = _config(args)
    d = Path(args.trajectories)
    traj = load_trajectories(d)
    labeller = make_labeller(cfg.reward.name, **cfg.reward.kwargs)
    maps, info = label_images(labeller, traj.images, traj.prompts, where=f"reward labeller {cfg.reward.name!r} on {d}")
    target = Path(args.out) if args.out else d
    if args.validate:
        from .validation import check, validate_reward_maps

        h, w = maps.shape[1:]
        report = validate_reward_maps(maps, num_samples=len(traj), height=h, width=w)
        check(report, _report_path(args, target / "reward_maps"))
    info = {"labeller": cfg.reward.name, "kwargs": cfg.reward.kwargs, **info}
    if args.out:  # a labelled copy, written whole or not at all (pipelines treat inputs as read-only)
        import shutil

        from .storage import atomic_dir

        with atomic_dir(target) as tmp:
            shutil.copytree(d, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MAPS, "*.validation.json"))
            save_reward_maps(tmp, maps, info)
    else:
        save_reward_maps(d, maps, info)
    print(f"labelled {len(traj)} samples with {cfg.reward.name}: mean reward {maps.mean().item():.4f}")
    return 0


def cmd_train(args) -> int:
    from .storage import atomic_dir
    from .tracking import JsonlTracker
    from .train import run
    from .trajectories import load_reward_maps, load_trajectories

    cfg = _config(args)
    d = Path(args.trajectories)
    traj = load_trajectories(d, with_images=False)
    hw = tuple(traj.meta["image_shape"][1:])
    maps, _ = load_reward_maps(d, len(traj), hw)
    for key in ("sampler", "num_steps", "eta", "guidance_scale"):
        if traj.meta.get(key, "ddim") != getattr(cfg.sample, key):
            raise PxpoInputError(
                f"sample.{key}",
                f"config says {getattr(cfg.sample, key)} but {d} was sampled with {traj.meta[key]}",
                f"train with the sampling settings: pass sample.{key}={traj.meta[key]}",
            )
    if traj.meta.get("negative_prompt", "") != cfg.prompts.negative_prompt:
        raise PxpoInputError("prompts.negative_prompt", f"differs from the one {d} was sampled with", "use the sampling-time negative prompt")
    if args.state and not (Path(args.state) / "pxpo_round.json").is_file():
        raise PxpoInputError(str(args.state), "not a trainer state directory (no pxpo_round.json)", "pass the --out of a previous `pxpo train`")
    rounds = args.rounds if args.rounds is not None else cfg.train.epochs
    with atomic_dir(Path(args.out)) as tmp:
        cfg.output_dir = str(tmp)
        summary = run(
            cfg,
            JsonlTracker(tmp),
            progress=not args.quiet,
            resume=False,
            first_batch=(traj, maps),
            init_state=Path(args.state) if args.state else None,
            rounds=rounds,
        )
    hist = [json.loads(x) for x in (Path(args.out) / "metrics.jsonl").read_text().splitlines() if x]
    if args.history:
        _write_history_csv(hist, Path(args.history))
    print(
        f"trained {rounds} round(s) to epoch {summary['completed_epochs']}: reward "
        + " -> ".join(f"{h['reward_mean']:.4f}" for h in hist)
    )
    return 0


def _write_history_csv(hist: list[dict], path: Path) -> None:
    """Per-epoch metrics as CSV (DVC plots)."""
    import csv

    from .storage import atomic_file

    keys = ["epoch", "samples_seen", "reward_mean", "reward_std", "approx_kl", "clipfrac", "loss", "grad_norm"]
    with atomic_file(path) as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(hist)


def _report_path(args, default_base: Path) -> Path:
    """Where a validation report goes: --report, else beside the artifact (kept on failure)."""
    if getattr(args, "report", None):
        return Path(args.report)
    return default_base.parent / f"{default_base.name}.validation.json"


def cmd_prepare(args) -> int:
    from .prepare import assign_splits, deduplicate, read_prompt_table, write_dataset
    from .validation import check, validate_prompts

    cfg = _config(args)
    src = Path(args.input or cfg.prepare.input)
    df = read_prompt_table(src)
    df, removed = deduplicate(df.dropna(subset=["prompt"]) if args.drop_empty else df)
    df = assign_splits(df, cfg.prepare)
    p = cfg.prepare
    report = validate_prompts(
        df, min_length=p.min_length, max_length=p.max_length, min_heldout=p.min_heldout, max_heldout_fraction=p.max_heldout_fraction
    )
    check(report, _report_path(args, Path(args.out)))
    info = write_dataset(df, Path(args.out), source=src, removed=removed)
    print(
        f"prepared {args.out}: {info['counts']['train']} train / {info['counts']['heldout']} held-out prompts, "
        f"{info['duplicates_removed']} duplicates removed, version {info['version'][:12]}"
    )
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate, summarize
    from .validation import check, validate_reward_maps

    cfg = _config(args)
    if args.prompts:
        cfg.prompts.source = args.prompts
    metrics = evaluate(
        cfg, args.policy, Path(args.out), samples_per_prompt=cfg.evaluate.samples_per_prompt, seed=cfg.evaluate.seed, progress=not args.quiet
    )
    from safetensors.torch import load_file

    maps = load_file(str(Path(args.out) / "reward_maps.safetensors"))["maps"]
    report = validate_reward_maps(maps, num_samples=metrics["num_samples"], height=maps.shape[1], width=maps.shape[2])
    report.save(Path(args.out) / "validation.json")
    check(report, Path(args.out) / "validation.json")
    if args.metrics:
        from .storage import write_json

        write_json(Path(args.metrics), {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    print(summarize(metrics))
    return 0


def cmd_register(args) -> int:
    from .tracking_mlflow import default_tracking_uri
    from .promote import gate_and_register

    cfg = _config(args)
    decision = gate_and_register(
        cfg,
        policy_dir=Path(args.policy),
        eval_dir=Path(args.eval),
        tracking_uri=args.tracking_uri or default_tracking_uri(Path(args.mlflow_root)),
        validation_reports=[Path(p) for p in args.validation],
        out=Path(args.out) if args.out else None,
    )
    print(
        f"registered {cfg.register.model_name} v{decision['version']} as challenger; "
        + ("PROMOTED to champion" if decision["promoted"] else "not promoted")
        + f" ({decision['reason']})"
    )
    return 0


def _params_text(args) -> str:
    import yaml

    from .config import dump_config

    cfg = _config(args)
    # The full resolved config (overrides applied) is compiled into the run's arguments.
    return cfg, dump_config(cfg) if args.overrides or not Path(args.params or "params.yaml").exists() else Path(args.params or "params.yaml").read_text()


def cmd_pipeline(args) -> int:
    from . import pipeline_cli as pc

    cfg, params_text = _params_text(args)
    opts = {"rounds": args.rounds} if getattr(args, "rounds", None) else {}
    if args.pipeline_command == "compile":
        out = pc.compile_pipeline(cfg, Path(args.out), opts)
        print(f"compiled {out} ({cfg.pipeline.rounds if not opts else opts['rounds']} rounds)")
        return 0
    prompts_uri = args.prompts_uri or str(Path(cfg.prepare.input).resolve())
    if args.pipeline_command == "run":
        if not args.local:
            raise PxpoInputError("pxpo pipeline run", "only --local is supported", "use `pxpo pipeline submit --host URL` for a cluster")
        model_ref = args.model_ref or (str(Path(cfg.model.path).resolve()) if Path(cfg.model.path).is_dir() else "embedded")
        workdir = Path(args.workdir).resolve()
        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(workdir / 'mlflow' / 'mlflow.db').resolve()}"
        (workdir / "mlflow").mkdir(parents=True, exist_ok=True)
        if opts:
            cfg.pipeline.rounds = opts["rounds"]
        result = pc.run_local(cfg, params_text, prompts_uri=prompts_uri, model_ref=model_ref, workdir=workdir, mlflow_tracking_uri=uri)
        print(json.dumps(result, indent=2, default=str))
        print(
            f"pipeline finished in {result['wall_seconds']:.0f}s: {cfg.register.model_name} v{result.get('version')} "
            + ("is champion" if result.get("promoted") else "registered as challenger (not promoted)")
            + f"; MLflow: {uri}"
        )
        return 0
    run_id = pc.submit(
        cfg,
        params_text,
        host=args.host,
        package=Path(args.package),
        prompts_uri=prompts_uri,
        model_ref=args.model_ref or cfg.model.path,
        mlflow_tracking_uri=args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""),
        experiment=args.experiment,
        run_name=args.run_name,
    )
    print(f"submitted run {run_id} to {args.host}")
    return 0


def cmd_labellers(args) -> int:
    from .core.rewards import REGISTRY

    for name, fn in sorted(REGISTRY.items()):
        doc = (fn.__doc__ or "").strip().splitlines()
        print(f"{name:24s} {doc[0] if doc else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pxpo", description="Pixel-wise RL fine-tuning of text-to-image diffusion models.")
    p.add_argument("--version", action="version", version=f"pxpo {__import__('pxpo').__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("--params", default=None, help="params.yaml (default: ./params.yaml if present)")
        sp.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.epochs=5")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")

    base = sub.add_parser("base", help="the embedded default model")
    bsub = base.add_subparsers(dest="base_command", required=True)
    b = bsub.add_parser("build", help="build and pretrain the tiny default pipeline (a few CPU minutes)")
    b.add_argument("--out", default="models/base")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--vae-steps", type=int, default=None)
    b.add_argument("--unet-steps", type=int, default=None)
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

    r = sub.add_parser("run", help="online loop: sample -> label -> train for train.epochs epochs")
    with_config(r)
    r.add_argument("--no-resume", action="store_true", help="start fresh even if checkpoints exist")
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

    ls = sub.add_parser("labellers", help="list reward labellers")
    ls.set_defaults(fn=cmd_labellers)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):  # also the model-loading bars of transformers / huggingface_hub / diffusers
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from .timing import timed

    name = " ".join(a for a in (args.command, getattr(args, "base_command", None), getattr(args, "pipeline_command", None)) if a)
    if args.command in ("prepare", "evaluate") or getattr(args, "validate", False):
        # Great Expectations takes ~5 s to import: let a worker process do it while the stage loads and computes
        from .validation import start_worker

        start_worker()
    try:
        with timed(f"stage:{name}"):
            return args.fn(args)
    except PxpoInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
