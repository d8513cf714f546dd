"""``pxpo``: the one command-line seam every stage (local, DVC, KFP) calls.

    pxpo base build [--out models/base]        build + pretrain the embedded default
    pxpo run    [--params params.yaml] [k=v ...]   online loop: sample -> label -> train, N epochs
    pxpo sample --out DIR [--lora DIR] [--epoch K] [k=v ...]   write a trajectory artifact
    pxpo label  --trajectories DIR [k=v ...]   write reward_maps.safetensors beside it
    pxpo train  --trajectories DIR --out DIR [--state DIR] [k=v ...]   one training pass
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
    stats = build_base(out, spec, progress=not args.quiet)
    print(
        f"built {out}: prompt-following accuracy {stats['prompt_following_accuracy']:.2f} "
        f"(digit classifier on 80 samples), {stats['total_seconds']:.0f}s; grid {out / 'samples.png'}"
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
    import torch

    from .models import load_pipeline, resolve_dtype
    from .prompts import draw_prompts, load_prompts
    from .train import sample_seed, sample_trajectories
    from .trajectories import save_trajectories

    cfg = _config(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(
        cfg.model.path,
        revision=cfg.model.revision,
        variant=cfg.model.variant,
        dtype=resolve_dtype(cfg.model.dtype, device),
        device=device,
    )
    if args.lora:
        pipe.load_lora_weights(args.lora)
    n = cfg.sample.batch_size * cfg.sample.num_batches
    prompts = draw_prompts(load_prompts(cfg.prompts.source), n, seed=sample_seed(cfg.seed, args.epoch, 0, 0))
    seeds = [sample_seed(cfg.seed, args.epoch, 0, i) for i in range(n)]
    traj = sample_trajectories(pipe, cfg, prompts, seeds, progress=not args.quiet)
    traj.meta["lora"] = args.lora
    save_trajectories(traj, Path(args.out))
    print(f"wrote {n} trajectories to {args.out}")
    return 0


def cmd_label(args) -> int:
    from .core.rewards import make_labeller
    from .train import label_images
    from .trajectories import load_trajectories, save_reward_maps

    cfg = _config(args)
    d = Path(args.trajectories)
    traj = load_trajectories(d)
    labeller = make_labeller(cfg.reward.name, **cfg.reward.kwargs)
    maps, info = label_images(labeller, traj.images, traj.prompts, where=f"reward labeller {cfg.reward.name!r} on {d}")
    save_reward_maps(d, maps, {"labeller": cfg.reward.name, "kwargs": cfg.reward.kwargs, **info})
    print(f"labelled {len(traj)} samples with {cfg.reward.name}: mean reward {maps.mean().item():.4f}")
    return 0


def cmd_train(args) -> int:
    from .core.advantages import PerPromptStatTracker
    from .models import load_lora_into
    from .storage import atomic_dir, write_json
    from .train import build_train_state, compute_advantages, save_policy, train_on_trajectories
    from .trajectories import load_reward_maps, load_trajectories

    cfg = _config(args)
    d = Path(args.trajectories)
    traj = load_trajectories(d, with_images=False)
    hw = tuple(traj.meta["image_shape"][1:])
    maps, _ = load_reward_maps(d, len(traj), hw)
    for key in ("num_steps", "eta", "guidance_scale"):
        if traj.meta[key] != getattr(cfg.sample, key):
            raise PxpoInputError(
                f"sample.{key}",
                f"config says {getattr(cfg.sample, key)} but {d} was sampled with {traj.meta[key]}",
                f"train with the sampling settings: pass sample.{key}={traj.meta[key]}",
            )
    pipe, state = build_train_state(cfg)
    stat_tracker = PerPromptStatTracker(cfg.train.buffer_size, cfg.train.min_count, cfg.train.baseline)
    state.accelerator.register_for_checkpointing(stat_tracker)
    round_idx = 0
    if args.state:
        sd = Path(args.state)
        if not (sd / "pxpo_round.json").is_file():
            raise PxpoInputError(str(sd), "not a trainer state directory (no pxpo_round.json)", "pass the --out of a previous `pxpo train`")
        state.accelerator.load_state(str(sd / "state"))
        round_idx = json.loads((sd / "pxpo_round.json").read_text())["completed_rounds"]
    unet_cfg = state.accelerator.unwrap_model(state.unet).config
    size = unet_cfg.sample_size
    latent_hw = (size, size) if isinstance(size, int) else tuple(size)
    adv = compute_advantages(stat_tracker, traj.prompts, maps, latent_hw, cfg.train.algorithm)
    logs = train_on_trajectories(state, traj, adv, cfg, round_idx, progress=not args.quiet)
    logs["reward_mean"] = maps.mean().item()
    with atomic_dir(Path(args.out)) as tmp:
        save_policy(state, cfg, tmp / ("lora" if cfg.train.use_lora else "model"))
        state.accelerator.save_state(str(tmp / "state"))
        (tmp / "pxpo_round.json").write_text(json.dumps({"completed_rounds": round_idx + 1}))
        write_json(tmp / "train_metrics.json", logs)
    print(f"trained round {round_idx} on {len(traj)} samples: " + ", ".join(f"{k} {v:.4g}" for k, v in logs.items()))
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
    b.add_argument("--force", action="store_true", help="rebuild even if the directory exists")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(fn=cmd_base_build)

    r = sub.add_parser("run", help="online loop: sample -> label -> train for train.epochs epochs")
    with_config(r)
    r.add_argument("--no-resume", action="store_true", help="start fresh even if checkpoints exist")
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("sample", help="sample trajectories with per-element log-probs")
    with_config(s)
    s.add_argument("--out", required=True, help="trajectory directory to write")
    s.add_argument("--lora", default=None, help="LoRA directory to load (a previous train output's lora/)")
    s.add_argument("--epoch", type=int, default=0, help="round index (changes the prompts and noise seeds)")
    s.set_defaults(fn=cmd_sample)

    lab = sub.add_parser("label", help="write reward maps beside a trajectory directory")
    with_config(lab)
    lab.add_argument("--trajectories", required=True)
    lab.set_defaults(fn=cmd_label)

    t = sub.add_parser("train", help="one training pass on labelled trajectories")
    with_config(t)
    t.add_argument("--trajectories", required=True)
    t.add_argument("--out", required=True, help="output: lora/ (or model/), state/, train_metrics.json")
    t.add_argument("--state", default=None, help="a previous `pxpo train --out` to continue from")
    t.set_defaults(fn=cmd_train)

    ls = sub.add_parser("labellers", help="list reward labellers")
    ls.set_defaults(fn=cmd_labellers)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except PxpoInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
