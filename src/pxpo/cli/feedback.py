"""Argument parsing of ``pxpo label-studio push|pull`` (``--pairs``: the pairwise task) and ``pxpo dense-reward train`` (kept beside
their stages so that pxpo.cli stays small; pxpo.cli calls :func:`add_feedback_parsers`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable


def add_feedback_parsers(sub, with_config: Callable, config: Callable) -> None:
    """Add the commands to ``sub`` (argparse subparsers); ``config(args)`` builds the Config as pxpo.cli does."""

    def push_cmd(args) -> int:
        from ..stages.label_studio import push, push_pairs

        if args.pairs:
            s = push_pairs(config(args), Path(args.trajectories))
            print(f"pushed {s['pushed']} pairs ({s['already']} already there; pairs from {s['pair_source']}) to {s['project_url']}")
            return 0
        s = push(config(args), Path(args.trajectories))
        print(f"pushed {s['pushed']} samples ({s['already']} already there) to {s['project_url']}")
        return 0

    def pull_cmd(args) -> int:
        from ..stages.label_studio import pull, pull_pairs

        if args.pairs:
            s = pull_pairs(config(args), Path(args.trajectories), out=Path(args.out) if args.out else None, validate=args.validate, report=args.report)
            if s["missing"]:
                print(f"not annotated ({len(s['missing'])}): pairs {s['missing']}", file=sys.stderr)
            print(f"pulled {s['annotations']} annotations of {s['annotated']} pairs: {s['num_pairs']} preference maps, "
                  f"mean {s['preference_mean']:+.4f} -> {s['out']}")
            return 0
        s = pull(config(args), Path(args.trajectories), out=Path(args.out) if args.out else None, validate=args.validate, report=args.report)
        if s["missing"]:
            print(f"not annotated ({len(s['missing'])}): samples {s['missing']}", file=sys.stderr)
        print(f"pulled {s['annotations']} annotations of {s['annotated']} samples: {s['num_samples']} maps, mean reward {s['reward_mean']:.4f} -> {s['out']}")
        return 0

    def dense_cmd(args) -> int:
        from ..stages.dense_reward import train_dense_reward

        s = train_dense_reward([Path(t) for t in args.trajectories], Path(args.out), steps=args.steps, heldout_fraction=args.heldout_fraction, seed=args.seed)
        print(f"trained a dense reward model on {s['train_samples']} samples: held-out per-pixel correlation {s['heldout_pixel_corr']:.3f} -> {s['out']}")
        return 0

    ls = sub.add_parser("label-studio", help="people paint reward maps in Label Studio (docs/labelling.md)")
    lsub = ls.add_subparsers(dest="ls_command", required=True)
    lp = lsub.add_parser("push", help="create/update the project (label.*) and upload a trajectory directory's samples")
    with_config(lp)
    lp.add_argument("--trajectories", required=True)
    lp.add_argument("--pairs", action="store_true", help="upload pairs (A | B side by side) to <label.project>-pairs instead")
    lp.set_defaults(fn=push_cmd)
    lq = lsub.add_parser("pull", help="finished annotations -> reward_maps.safetensors (as `pxpo label` writes)")
    with_config(lq)
    lq.add_argument("--trajectories", required=True)
    lq.add_argument("--out", default=None, help="write a labelled copy here instead of labelling in place")
    lq.add_argument("--validate", action="store_true", help="run the Great Expectations reward-map suite before writing")
    lq.add_argument("--report", default=None, help="validation report path (default: <out>/reward_maps.validation.json)")
    lq.add_argument("--pairs", action="store_true", help="pull <label.project>-pairs -> preference_maps.safetensors (one map in [-1, 1] per pair)")
    lq.set_defaults(fn=pull_cmd)

    dr = sub.add_parser("dense-reward", help="a learned dense reward model (reward.name: dense_model)")
    dsub = dr.add_subparsers(dest="dr_command", required=True)
    dt = dsub.add_parser("train", help="train it on labelled trajectory directories; save_pretrained-style output")
    dt.add_argument("--trajectories", nargs="+", required=True, help="labelled trajectory directories (reward_maps.safetensors)")
    dt.add_argument("--out", required=True)
    dt.add_argument("--steps", type=int, default=400)
    dt.add_argument("--heldout-fraction", type=float, default=0.2)
    dt.add_argument("--seed", type=int, default=0)
    dt.add_argument("--quiet", action="store_true")
    dt.set_defaults(fn=dense_cmd)
