"""The handlers of ``pxpo``'s subcommands: each parses nothing, calls one stage function and prints its summary line.

:func:`pxpo.cli.build_parser` wires them to the argument parser; a handler returns the exit status.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import PxpoInputError


def config_of(args):
    """The :class:`pxpo.config.Config` of a parsed command line: ``--params`` (default ./params.yaml if present), overrides, ``--sections``."""
    from ..config import load_config

    params = args.params
    if params is None and Path("params.yaml").exists():
        params = "params.yaml"
    sections = getattr(args, "sections", None)
    if sections:
        return load_config(params, args.overrides, sections=[s for s in sections.split(",") if s])
    return load_config(params, args.overrides)



def cmd_base_build(args) -> int:
    from ..stages.base import build_base_model, default_out

    out = Path(args.out or default_out(args.arch))
    kw = dict(vae_steps=args.vae_steps, unet_steps=args.unet_steps, text_lr_mult=args.text_lr_mult, force=args.force, progress=not args.quiet)
    stats = build_base_model(out, arch=args.arch, seed=args.seed, **kw)
    if stats is None:
        import json

        record = out / "build.json"
        built = json.loads(record.read_text()) if record.is_file() else {}
        acc = built.get("prompt_following_accuracy")
        what = f" (prompt-following accuracy {acc:.2f} at build time; {record})" if acc is not None else ""
        print(f"using {out}{what}; --force rebuilds it")
        return 0
    acc, secs = stats["prompt_following_accuracy"], stats["total_seconds"]
    print(f"built {out}: prompt-following accuracy {acc:.2f} (digit classifier on 80 samples), {secs:.0f}s; grid {out / 'samples.png'}")
    return 0


def cmd_base_lcm(args) -> int:
    from ..stages.base import distill_lcm_model

    stats = distill_lcm_model(Path(args.teacher), Path(args.out), seed=args.seed, steps=args.steps, force=args.force, progress=not args.quiet)
    if stats is None:
        print(f"{args.out} exists (use --force to rebuild)")
        return 0
    print(
        f"distilled {args.out}: prompt-following accuracy "
        + ", ".join(f"{k} steps {stats[f'prompt_following_accuracy_{k}_steps']:.2f}" for k in (2, 4, 8))
        + f"; {stats['total_seconds']:.0f}s; grid {Path(args.out) / 'samples.png'}"
    )
    return 0


def cmd_base_random(args) -> int:
    from ..stages.base import save_random_model

    info = save_random_model(Path(args.out), arch=args.arch, dtype=args.dtype, seed=args.seed, force=args.force)
    if info is None:
        print(f"{args.out} exists (use --force to rebuild)")
        return 0
    counts = ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in info["parameters"].items())
    print(f"saved a RANDOM-weight {args.arch} pipeline ({args.dtype}) to {args.out}: {counts}; a timing fixture, not a model to fine-tune")
    return 0


def cmd_run(args) -> int:
    from ..stages.online import launch, run_online

    cfg = config_of(args)
    if args.processes is not None:  # this command again as N data-parallel processes (torchrun)
        return launch(cfg, args.processes, args)
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")  # MLflow while it trains (neither: none)
    summary = run_online(cfg, progress=not args.quiet, resume=not args.no_resume, tracking_uri=tracking_uri)
    if "reward_first" in summary:
        print(
            f"reward {summary['reward_first']:.4f} -> {summary['reward_last']:.4f} "
            f"over {summary['completed_epochs']} epochs; curve {Path(cfg.output_dir) / 'reward_curve.png'}"
        )
    return 0


def cmd_sample(args) -> int:
    from ..stages.sample import sample

    s = sample(config_of(args), Path(args.out), policy=args.policy, epoch=args.epoch, validate=args.validate, report=args.report, progress=not args.quiet)
    print(f"wrote {s['num_samples']} trajectories to {s['out']}")
    return 0


def cmd_label(args) -> int:
    from ..stages.label import label

    s = label(config_of(args), Path(args.trajectories), out=Path(args.out) if args.out else None, validate=args.validate, report=args.report)
    pairs = f"; {s['num_pairs']} preference maps (mean {s['preference_mean']:+.4f})" if "num_pairs" in s else ""
    print(f"labelled {s['num_samples']} samples with {s['labeller']}: mean reward {s['reward_mean']:.4f}{pairs}")
    return 0


def cmd_train(args) -> int:
    from ..stages.train import train

    s = train(
        config_of(args), Path(args.trajectories), Path(args.out), state=Path(args.state) if args.state else None,
        rounds=args.rounds, history=Path(args.history) if args.history else None, progress=not args.quiet,
    )
    print(
        f"trained {s['rounds']} round(s) to epoch {s['completed_epochs']}: reward "
        + " -> ".join(f"{h['reward_mean']:.4f}" for h in s["history"])
        + ("; preference accuracy " + " -> ".join(f"{h['pref_accuracy']:.2f}" for h in s["history"]) if s["history"] and "pref_accuracy" in s["history"][0] else "")
    )
    return 0


def cmd_prepare(args) -> int:
    from ..stages.prepare import prepare

    info = prepare(config_of(args), Path(args.out), input=args.input, report=args.report, drop_empty=args.drop_empty)
    print(
        f"prepared {args.out}: {info['counts']['train']} train / {info['counts']['heldout']} held-out prompts, "
        f"{info['duplicates_removed']} duplicates removed, version {info['version'][:12]}"
    )
    return 0


def cmd_evaluate(args) -> int:
    from ..evaluate import summarize
    from ..stages.evaluate import evaluate

    metrics = evaluate(
        config_of(args), Path(args.out), policy=args.policy, prompts=args.prompts,
        metrics=Path(args.metrics) if args.metrics else None, progress=not args.quiet,
    )
    print(summarize(metrics))
    return 0


def cmd_register(args) -> int:
    from ..stages.register import register

    cfg = config_of(args)
    decision = register(
        cfg, Path(args.policy), Path(args.eval), tracking_uri=args.tracking_uri, mlflow_root=Path(args.mlflow_root),
        validation_reports=[Path(p) for p in args.validation], out=Path(args.out) if args.out else None,
    )
    print(
        f"registered {cfg.register.model_name} v{decision['version']} as challenger; "
        + ("PROMOTED to champion" if decision["promoted"] else "not promoted")
        + f" ({decision['reason']})"
    )
    return 0


def cmd_pipeline(args) -> int:
    from pipelines import commands as kc

    cfg = config_of(args)  # the whole resolved config: each task is given its sections of it (pxpo.kubeflow.launcher)
    opts = {"rounds": args.rounds} if getattr(args, "rounds", None) else {}
    if args.pipeline_command == "compile" and cfg.label.mode == "human":  # two pipelines, people in between (README)
        from pipelines.human_in_the_loop import compile_human_pipelines, options_like
        print("compiled {} and {} (label.mode: human)".format(*compile_human_pipelines(Path(args.out).parent, options_like(kc.options_from(cfg, opts)))))
        return 0
    if args.pipeline_command == "compile":
        out = kc.compile_pipeline(cfg, Path(args.out), opts)
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
        result = kc.run_local(cfg, prompts_uri=prompts_uri, model_ref=model_ref, workdir=workdir, mlflow_tracking_uri=uri, options=opts, verbose=args.verbose)
        from ..mlflow.promotion import format_summary

        decided = "PROMOTED to champion" if result.get("promoted") else "registered as challenger, NOT promoted"
        print(f"pipeline finished in {result['wall_seconds']:.0f}s: {cfg.register.model_name} v{result.get('version')} {decided}; MLflow: {uri}")
        if summary := format_summary(result.get("summary") or {}):
            print(f"  {summary}")
        return 0
    run_id = kc.submit(
        cfg,
        host=args.host,
        package=Path(args.package),
        prompts_uri=prompts_uri,
        model_ref=args.model_ref or cfg.model.path,
        mlflow_tracking_uri=args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""),
        experiment=args.experiment,
        run_name=args.run_name,
        options=opts,
    )
    print(f"submitted run {run_id} to {args.host}")
    return 0


def cmd_labellers(args) -> int:
    from ..labellers import print_labellers  # built-in, installed plugins, the config's module:function references

    print_labellers(config_of(args))
    return 0

