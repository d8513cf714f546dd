"""Argument parsing of ``pxpo pairs import`` (a team's own image pairs -> a trajectory directory for ``diffusion_dpo``;
:mod:`pxpo.stages.pairs`); pxpo.cli calls :func:`add_pairs_parsers`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def add_pairs_parsers(sub, with_config: Callable, config: Callable) -> None:
    """Add ``pairs import`` to ``sub`` (argparse subparsers); ``config(args)`` builds the Config as pxpo.cli does."""

    def import_cmd(args) -> int:
        from ..stages.pairs import import_pairs

        s = import_pairs(config(args), Path(args.images), Path(args.prefs), Path(args.out), resize=args.resize)
        print(f"imported {s['num_pairs']} pairs ({s['num_maps']} preference maps, {s['num_whole']} whole-image preferences; "
              f"mean {s['preference_mean']:+.4f}) at {s['image_hw'][0]} x {s['image_hw'][1]} -> {s['out']}")
        print(f"train: pxpo train --trajectories {s['out']} --out DIR --rounds 1 train.algorithm=diffusion_dpo " + " ".join(s["train_overrides"]))
        return 0

    pairs = sub.add_parser("pairs", help="image pairs a team already has (train.algorithm: diffusion_dpo)")
    psub = pairs.add_subparsers(dest="pairs_command", required=True)
    pi = psub.add_parser("import", help="a folder of image pairs + a preference file -> a trajectory directory (VAE-encoded with model.path)")
    with_config(pi)
    pi.add_argument("--images", required=True, help="folder of the images (the preference file's paths are relative to it)")
    pi.add_argument("--prefs", required=True, help=".jsonl or .csv, one pair a record: prompt, a, b, and preference (-1..1, A/B/tie) or map (an image)")
    pi.add_argument("--out", required=True, help="trajectory directory to write (with preference_maps.safetensors)")
    pi.add_argument("--resize", action="store_true", help="resize images (and maps) to the model's resolution instead of refusing other sizes")
    pi.set_defaults(fn=import_cmd)
