"""Pixel credit for a scalar reward: occlusion vs gradient attribution, seconds per batch (issue 22 item 3).

    python bench/attribution_time.py [--threads 1] [--repeats 3] [--out bench/results/attribution_time.json]

The images are the tiny default's: 16 x 16 digits (scikit-learn's, as the
embedded model is trained on), prompts "a handwritten digit N". The scalar
reward is ``clip_score`` on two random-weight CLIPs saved with
save_pretrained (the labeller loads them as it loads a hub id):

* ``tiny``: the tests' CLIP (hidden 32, 2 layers, 32 px input, patch 8), at
  the tiny default's batch (sample.batch_size 32);
* ``vit-b/32``: CLIP ViT-B/32's shape (vision 768 x 12 layers at 224 px in
  32 px patches, text 512 x 12), batch 8: the cost of a real scorer.

For each: ``occlusion`` (patch 4, fill 0.5: 1 + 16 forwards per image),
``attribution`` ``gradient`` (patch 4: one forward and one backward per batch)
and ``integrated`` (8 steps). The median of ``--repeats`` calls after one
warm-up call, one thread by default. Also the mean per-image Pearson
correlation of each attribution map with the occlusion map on occlusion's 16
patches (the attribution at the pixel whose 4 x 4 window is the patch), on
the same images. Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

CLIPS = {
    "tiny": dict(batch=32, text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
                 vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
                 projection_dim=16, crop=32),
    "vit-b/32": dict(batch=8, text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
                     vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=32),
                     projection_dim=512, crop=224),
}
ADAPTERS = {
    "occlusion (patch 4)": ("occlusion", {"patch": 4}),
    "attribution gradient (patch 4)": ("attribution", {"method": "gradient", "patch": 4}),
    "attribution integrated, 8 steps (patch 4)": ("attribution", {"method": "integrated", "steps": 8, "patch": 4}),
}


def save_clip(spec: dict, d: Path, tok) -> str:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    ids = dict(vocab_size=len(tok), max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config={**spec["text"], **ids}, vision_config=spec["vision"], projection_dim=spec["projection_dim"])).save_pretrained(d)
    ip = CLIPImageProcessor(size={"shortest_edge": spec["crop"]}, crop_size={"height": spec["crop"], "width": spec["crop"]})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(d)
    return str(d)


def timed(fn, images, prompts, repeats: int) -> tuple[float, torch.Tensor]:
    maps, _ = fn(images, prompts)  # warm-up (and the maps)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(images, prompts)
        times.append(time.perf_counter() - t)
    return statistics.median(times), maps


def correlation(attr: torch.Tensor, occ: torch.Tensor, patch: int = 4) -> float:
    """Mean over images of the Pearson correlation of an attribution map with the occlusion map on occlusion's
    patches: occlusion's value of each patch against the attribution's at the pixel whose window is that patch."""
    lo = (patch - 1) // 2
    a, b = attr[:, lo::patch, lo::patch].double().flatten(1), occ[:, ::patch, ::patch].double().flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clips", default=",".join(CLIPS), help="comma-separated: " + ", ".join(CLIPS))
    ap.add_argument("--out", default="bench/results/attribution_time.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from pxpo.core import rewards as R
    from pxpo.embedded.digits import digits_dataset
    from pxpo.embedded.tokenizer import build_tokenizer
    from pxpo import labellers  # noqa: F401  (registers clip_score)

    images, labels = digits_dataset(16)
    tok = build_tokenizer(16)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.clips.split(","):
            spec = CLIPS[name]
            path = save_clip(spec, Path(tmp) / name.replace("/", "-"), tok)
            x, y = (images[: spec["batch"]] + 1) / 2, labels[: spec["batch"]].tolist()
            prompts = [f"a handwritten digit {d}" for d in y]
            with torch.no_grad():
                base_s, _ = timed(R.make_labeller("clip_score", model=path), x, prompts, args.repeats)
            rows.append({"clip": name, "batch": len(y), "adapter": "clip_score alone (constant maps)", "seconds_per_batch": base_s,
                         "correlation_with_occlusion": None})
            occ = None
            for label, (adapter, kw) in ADAPTERS.items():
                fn = R.make_labeller(adapter, base="clip_score", base_kwargs={"model": path}, **kw)
                with torch.no_grad():  # as the loop labels
                    secs, maps = timed(fn, x, prompts, args.repeats)
                occ = maps if adapter == "occlusion" else occ
                rows.append({"clip": name, "batch": len(y), "adapter": label, "seconds_per_batch": secs,
                             "correlation_with_occlusion": None if adapter == "occlusion" else correlation(maps, occ)})
                print(f"{name:9s} {label:44s} {secs:8.3f} s", flush=True)
    for r in rows:
        occ_s = next(o["seconds_per_batch"] for o in rows if o["clip"] == r["clip"] and o["adapter"].startswith("occlusion"))
        r["speedup_vs_occlusion"] = occ_s / r["seconds_per_batch"]
    result = {"threads": args.threads, "repeats": args.repeats, "image_size": 16, "torch": torch.__version__, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'clip':9s} {'batch':>5s}  {'adapter':44s} {'s/batch':>9s} {'x occl.':>8s} {'corr':>6s}")
    for r in rows:
        corr = "" if r["correlation_with_occlusion"] is None else f"{r['correlation_with_occlusion']:.3f}"
        print(f"{r['clip']:9s} {r['batch']:5d}  {r['adapter']:44s} {r['seconds_per_batch']:9.3f} {r['speedup_vs_occlusion']:8.1f} {corr:>6s}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
