"""The embedded default: a tiny Stable-Diffusion-style pipeline built and pretrained offline.

``pxpo base build`` creates every component from scratch, with no download:

* a byte-level BPE tokenizer trained locally on the prompt corpus
  (:class:`transformers.CLIPTokenizer`, so the pipeline is a stock
  :class:`diffusers.StableDiffusionPipeline`),
* a tiny :class:`transformers.CLIPTextModel` (trained jointly with the UNet),
* a small :class:`diffusers.AutoencoderKL` with VAE factor 2
  (16 x 16 x 3 images <-> 8 x 8 x 4 latents),
* a :class:`diffusers.UNet2DConditionModel` with cross-attention at both levels,

then pretrains the VAE and the UNet + text encoder for a few CPU minutes on
scikit-learn's 8 x 8 handwritten digits (upsampled to 16 x 16, grey on RGB) with
prompts such as ``"a handwritten digit 7"``, and saves it with ``save_pretrained``.
Everything else in pxpo loads models through ``from_pretrained(path_or_hub_id)``,
so this directory and a user's SD 1.x/2.x checkpoint take the same code path.

:func:`make_tiny_pipeline` builds the same architecture with random weights in
well under a second: the test suite uses it (only the main job pretrains).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digit_prompt(d: int) -> str:
    """The canonical prompt for digit ``d`` (what the model is pretrained on)."""
    return f"a handwritten digit {d}"


@dataclass
class BaseModelSpec:
    """Architecture and pretraining budget of the embedded default.

    Every field has a default that gives recognisable digits in a few CPU minutes.
    """

    image_size: int = 16  # pixels per side of the generated images
    vae_channels: tuple[int, ...] = (32, 64)  # VAE block widths; factor = 2 ** (len - 1)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64)  # UNet block widths (cross-attention at each level)
    text_dim: int = 32  # width of the text encoder and the UNet's cross-attention
    text_layers: int = 2
    max_length: int = 16  # tokenizer.model_max_length (tokens incl. start/end)
    vae_steps: int = 600  # VAE pretraining steps
    unet_steps: int = 3000  # UNet + text encoder pretraining steps (1,500 gave seed-dependent prompt following: 0.12-0.89)
    batch_size: int = 32
    vae_lr: float = 2e-3
    unet_lr: float = 1e-3
    text_lr_mult: float = 1.0  # text encoder learning rate = unet_lr * this
    uncond_prob: float = 0.1  # fraction of empty prompts (for classifier-free guidance)
    ema_decay: float = 0.995
    seed: int = 0


def _tokenizer_corpus() -> list[str]:
    words = (
        "a an the handwritten digit number image photo picture of with and in on at "
        "left right top bottom center middle half side bright dark light black white "
        "grey gray red green blue yellow colour color big small thick thin bold"
    )
    corpus = [digit_prompt(d) for d in range(10)] + [f"the number {w}" for w in DIGIT_WORDS]
    return corpus + [words] * 3


def build_tokenizer(max_length: int = 16):
    """Learn a byte-level BPE vocabulary from the prompt corpus; wrap it as a CLIPTokenizer.

    Classic BPE training on the corpus words (the same pre-tokenisation as
    CLIP: words, single digits, punctuation runs; byte-level alphabet; ``</w>``
    ends a word), merging until every corpus word is one token. Deterministic:
    frequency ties are broken by the pair's text (the `tokenizers` trainer breaks
    them differently from run to run, which changed the model built).
    Unknown words still tokenize: every byte, with and without ``</w>``, is in
    the vocabulary.
    """
    import re

    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    byte_map = dict(zip(range(256), _bytes_to_unicode()))
    counts: dict[tuple[str, ...], int] = {}
    for line in _tokenizer_corpus():
        for w in re.findall(r"[^\W\d_]+|\d|[^\s\w]+", " ".join(line.lower().split())):
            chars = [byte_map[b] for b in w.encode("utf-8")]
            key = tuple(chars[:-1] + [chars[-1] + "</w>"])
            counts[key] = counts.get(key, 0) + 1
    # Classic BPE (Sennrich et al.): repeatedly merge the most frequent adjacent
    # pair; ties broken by the pair's text, so the result is deterministic.
    merges: list[tuple[str, str]] = []
    while True:
        pairs: dict[tuple[str, str], int] = {}
        for word, c in counts.items():
            for pair in zip(word, word[1:]):
                pairs[pair] = pairs.get(pair, 0) + c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        new_counts: dict[tuple[str, ...], int] = {}
        for word, c in counts.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_counts[tuple(out)] = new_counts.get(tuple(out), 0) + c
        counts = new_counts
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch + "</w>", len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte -> printable unicode character table (for byte 0..255 in order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def build_components(spec: BaseModelSpec | None = None, seed: int = 0) -> dict:
    """Randomly initialised components of the tiny pipeline (no training).

    Returns the kwargs of :class:`diffusers.StableDiffusionPipeline`.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = spec or BaseModelSpec()
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(spec.max_length)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_dim,
            intermediate_size=spec.text_dim * 2,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=4,
            max_position_embeddings=spec.max_length,
            projection_dim=spec.text_dim,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    n_vae = len(spec.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae,
        block_out_channels=spec.vae_channels,
        latent_channels=spec.latent_channels,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=spec.image_size,
    )
    n_unet = len(spec.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=spec.image_size // 2 ** (n_vae - 1),
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        block_out_channels=spec.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n_unet,
        up_block_types=("CrossAttnUpBlock2D",) * n_unet,
        layers_per_block=1,
        cross_attention_dim=spec.text_dim,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    # Stable Diffusion's schedule and DDIM settings.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return dict(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_tiny_pipeline(seed: int = 0, spec: BaseModelSpec | None = None):
    """A randomly initialised tiny StableDiffusionPipeline (for tests)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**build_components(spec, seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def digits_dataset(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's handwritten digits as RGB images.

    Returns:
        images: (N, 3, S, S) float32 in [-1, 1] (white ink on black), N = 1797.
        labels: (N,) int64 digit classes.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1).repeat(1, 3, 1, 1) * 2 - 1
    return x, torch.from_numpy(d.target.astype(np.int64))


def digit_classifier():
    """A logistic-regression classifier of 8 x 8 digits (sklearn data, ~97% accurate).

    Used to check that samples are recognisable and follow the prompt.
    """
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    d = load_digits()
    return LogisticRegression(max_iter=2000).fit(d.data / 16.0, d.target)


def classify_images(clf, images: torch.Tensor) -> np.ndarray:
    """Predict digit classes of images (B, 3, H, W) in [0, 1] with :func:`digit_classifier`."""
    g = images.float().mean(1, keepdim=True)
    g = F.adaptive_avg_pool2d(g, 8).flatten(1).clamp(0, 1).numpy()
    return clf.predict(g)


def _cosine(step: int, total: int, warmup: int = 50) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


def pretrain(pipe, spec: BaseModelSpec, progress: bool = True) -> dict:
    """Pretrain the VAE, then the UNet and text encoder jointly, in place.

    Returns figures (losses, seconds per phase) for the build report.
    """
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(spec.seed)
    images, labels = digits_dataset(spec.image_size)
    n = images.shape[0]
    stats: dict = {}

    # --- VAE: reconstruction + small KL ---------------------------------
    vae = pipe.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=spec.vae_lr, weight_decay=0.0)
    t0 = time.perf_counter()
    bar = tqdm(range(spec.vae_steps), desc="pretrain vae", disable=not progress)
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = spec.vae_lr * _cosine(step, spec.vae_steps)
        idx = torch.randint(0, n, (spec.batch_size,), generator=g)
        x = images[idx]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 1e-3 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    stats["vae_final_loss"] = float(loss.item())
    stats["vae_seconds"] = time.perf_counter() - t0

    with torch.no_grad():
        dists = [vae.encode(images[i : i + 256]).latent_dist for i in range(0, n, 256)]
        mean = torch.cat([d.mean for d in dists])
        std = torch.cat([d.std for d in dists])
    scaling = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)
    stats["vae_scaling_factor"] = scaling

    # --- UNet + text encoder: epsilon prediction ------------------------
    unet, te, tok = pipe.unet.train(), pipe.text_encoder.train(), pipe.tokenizer
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(
        [{"params": list(unet.parameters()), "mult": 1.0}, {"params": list(te.parameters()), "mult": spec.text_lr_mult}],
        lr=spec.unet_lr,
        weight_decay=1e-4,
    )
    ema = EMAModel(params, decay=spec.ema_decay, use_ema_warmup=True, power=0.75)
    prompts = [digit_prompt(d) for d in range(10)] + [""]
    ids_all = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    t0 = time.perf_counter()
    bar = tqdm(range(spec.unet_steps), desc="pretrain unet", disable=not progress)
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = spec.unet_lr * grp.get("mult", 1.0) * _cosine(step, spec.unet_steps)
        idx = torch.randint(0, n, (spec.batch_size,), generator=g)
        eps0 = torch.randn(mean[idx].shape, generator=g)
        z = (mean[idx] + std[idx] * eps0) * scaling
        drop = torch.rand(spec.batch_size, generator=g) < spec.uncond_prob
        ids = ids_all[torch.where(drop, torch.full_like(labels[idx], 10), labels[idx])]
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (spec.batch_size,), generator=g)
        zt = noise_sched.add_noise(z, noise, t)
        cond = te(ids).last_hidden_state
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.step(params)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(params)
    unet.eval().requires_grad_(False)
    te.eval().requires_grad_(False)
    stats["unet_final_loss"] = float(loss.item())
    stats["unet_seconds"] = time.perf_counter() - t0
    return stats


def evaluate_digits(pipe, per_digit: int = 8, steps: int = 20, guidance: float = 3.0, seed: int = 0):
    """Sample ``per_digit`` images of each digit with the stock diffusers pipeline.

    Returns (images (10*per_digit, 3, H, W) in [0, 1], prompt-following accuracy
    according to :func:`digit_classifier`).
    """
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    prompts = [digit_prompt(d) for d in range(10) for _ in range(per_digit)]
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = pipe(
        prompts,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    pred = classify_images(digit_classifier(), out)
    target = np.repeat(np.arange(10), per_digit)
    return out, float((pred == target).mean())


def save_grid(images: torch.Tensor, path: Path, nrow: int, scale: int = 4) -> None:
    """Write images (B, 3, H, W) in [0, 1] as one PNG grid, upscaled ``scale`` x."""
    from PIL import Image

    b, c, h, w = images.shape
    ncol = math.ceil(b / nrow)
    grid = torch.zeros(3, ncol * (h + 1), nrow * (w + 1))
    for i, im in enumerate(images):
        r, k = divmod(i, nrow)
        grid[:, r * (h + 1) : r * (h + 1) + h, k * (w + 1) : k * (w + 1) + w] = im
    arr = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    img.save(path)


def build_base(out_dir: Path, spec: BaseModelSpec, progress: bool = True) -> dict:
    """Build, pretrain and save the embedded default at ``out_dir`` (atomically).

    Writes the diffusers pipeline, ``samples.png`` (a grid of 8 samples of each
    digit, one row per digit) and ``build.json`` (figures). Returns the figures.
    """
    from .storage import atomic_dir

    torch.manual_seed(spec.seed)
    t0 = time.perf_counter()
    pipe = make_tiny_pipeline(spec.seed, spec)
    stats = pretrain(pipe, spec, progress=progress)
    images, acc = evaluate_digits(pipe, seed=spec.seed)
    stats["prompt_following_accuracy"] = acc
    stats["total_seconds"] = time.perf_counter() - t0
    stats["params"] = {
        "unet": sum(p.numel() for p in pipe.unet.parameters()),
        "vae": sum(p.numel() for p in pipe.vae.parameters()),
        "text_encoder": sum(p.numel() for p in pipe.text_encoder.parameters()),
    }
    stats["spec"] = asdict(spec)
    stats["torch_threads"] = torch.get_num_threads()
    with atomic_dir(Path(out_dir)) as tmp:
        pipe.save_pretrained(tmp)
        save_grid(images, tmp / "samples.png", nrow=8)
        (tmp / "build.json").write_text(json.dumps(stats, indent=2))
    return stats


# ---------------------------------------------------------------------------
# Latent consistency distillation (LCD) of the tiny teacher -> a 2-8 step model
# ---------------------------------------------------------------------------


@dataclass
class LCMSpec:
    """Budget of the consistency distillation of the embedded default."""

    steps: int = 1000  # distillation steps
    batch_size: int = 32
    lr: float = 5e-4
    guidance_min: float = 1.5  # teacher CFG scale range sampled per example (w = scale - 1 is embedded)
    guidance_max: float = 4.0
    skip: int = 20  # DDIM solver skip: 1000 / original_inference_steps (50)
    ema_decay: float = 0.95  # target network EMA, as in the LCM paper
    w_dim: int = 32  # w-embedding size (UNet time_cond_proj_dim)
    seed: int = 0


def distill_lcm(teacher_pipe, spec: LCMSpec, progress: bool = True):
    """Latent consistency distillation (Luo et al. 2023, arXiv 2310.04378) of ``teacher_pipe``.

    The student is the teacher's UNet plus a w-embedding input (guidance
    distilled in), trained so that its consistency function f(x_{t+k}) matches
    the EMA target's f(x_t), where x_t is one teacher DDIM step (with CFG)
    from x_{t+k}. Returns (student pipeline with an LCMScheduler, figures).
    """
    import copy

    from diffusers import DDPMScheduler, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
    from tqdm.auto import tqdm

    from .core.lcm import boundary_scalings, guidance_embedding

    g = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    vae, te, tok, teacher = teacher_pipe.vae, teacher_pipe.text_encoder, teacher_pipe.tokenizer, teacher_pipe.unet
    teacher.eval().requires_grad_(False)
    student = UNet2DConditionModel.from_config(teacher.config, time_cond_proj_dim=spec.w_dim)
    student.load_state_dict(teacher.state_dict(), strict=False)
    with torch.no_grad():  # w-embedding starts as a no-op
        student.time_embedding.cond_proj.weight.zero_()
    target = copy.deepcopy(student).eval().requires_grad_(False)
    student.train()

    images, labels = digits_dataset(vae.config.sample_size)
    with torch.no_grad():
        dists = [vae.encode(images[i : i + 256]).latent_dist for i in range(0, len(images), 256)]
    mean, std = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
    sf = vae.config.scaling_factor
    with torch.no_grad():
        ids = tok([digit_prompt(d) for d in range(10)] + [""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        emb = te(ids)[0]
    sched = DDPMScheduler.from_config(teacher_pipe.scheduler.config)
    ac = sched.alphas_cumprod
    n_solver = sched.config.num_train_timesteps // spec.skip
    solver_ts = torch.arange(1, n_solver + 1) * spec.skip - 1  # 19, 39, ..., 999

    opt = torch.optim.AdamW(student.parameters(), lr=spec.lr, weight_decay=0.0)
    t0 = time.perf_counter()
    bar = tqdm(range(spec.steps), desc="distill lcm", disable=not progress)
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = spec.lr * _cosine(step, spec.steps)
        idx = torch.randint(0, len(images), (spec.batch_size,), generator=g)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * sf
        cond = emb[labels[idx]]
        uncond = emb[10:].expand_as(cond)
        k = torch.randint(0, n_solver, (spec.batch_size,), generator=g)
        t_start = solver_ts[k]
        t_end = (t_start - spec.skip).clamp(min=0)
        noise = torch.randn(x0.shape, generator=g)
        x_start = sched.add_noise(x0, noise, t_start)
        w = spec.guidance_min + (spec.guidance_max - spec.guidance_min) * torch.rand(spec.batch_size, generator=g)
        w_emb = guidance_embedding(w - 1.0, spec.w_dim)

        def shape(v):
            return v.view(-1, 1, 1, 1)

        a_s, a_e = shape(ac[t_start]), shape(ac[t_end])
        cs_s, co_s = (shape(v) for v in boundary_scalings(t_start))
        cs_e, co_e = (shape(v) for v in boundary_scalings(t_end))

        eps = student(x_start, t_start, timestep_cond=w_emb, encoder_hidden_states=cond).sample
        pred_x0 = (x_start - (1 - a_s).sqrt() * eps) / a_s.sqrt()
        model_pred = cs_s * x_start + co_s * pred_x0
        with torch.no_grad():
            out = teacher(torch.cat([x_start, x_start]), torch.cat([t_start, t_start]), encoder_hidden_states=torch.cat([uncond, cond])).sample
            e_u, e_c = out.chunk(2)
            e_t = e_u + shape(w) * (e_c - e_u)
            x0_t = (x_start - (1 - a_s).sqrt() * e_t) / a_s.sqrt()
            x_end = a_e.sqrt() * x0_t + (1 - a_e).sqrt() * e_t  # one deterministic DDIM step of the teacher
            eps_tg = target(x_end, t_end, timestep_cond=w_emb, encoder_hidden_states=cond).sample
            x0_tg = (x_end - (1 - a_e).sqrt() * eps_tg) / a_e.sqrt()
            target_pred = cs_e * x_end + co_e * x0_tg
        loss = F.mse_loss(model_pred.float(), target_pred.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pt, ps in zip(target.parameters(), student.parameters()):
                pt.mul_(spec.ema_decay).add_(ps.detach(), alpha=1 - spec.ema_decay)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    stats = {"lcm_final_loss": float(loss.item()), "lcm_seconds": time.perf_counter() - t0}
    lcm_sched = LCMScheduler.from_config(teacher_pipe.scheduler.config, original_inference_steps=n_solver)
    pipe = LatentConsistencyModelPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=target, scheduler=lcm_sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, stats


def evaluate_lcm_digits(pipe, per_digit: int = 8, steps: int = 4, guidance: float = 3.0, seed: int = 0):
    """Like :func:`evaluate_digits`, for a LatentConsistencyModelPipeline (``steps`` consistency steps)."""
    prompts = [digit_prompt(d) for d in range(10) for _ in range(per_digit)]
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = pipe(
        prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed), output_type="pt",
    ).images
    pred = classify_images(digit_classifier(), out)
    return out, float((pred == np.repeat(np.arange(10), per_digit)).mean())


def build_lcm(teacher_dir: Path, out_dir: Path, spec: LCMSpec, progress: bool = True) -> dict:
    """Distil the teacher at ``teacher_dir`` into a consistency model saved (atomically) at ``out_dir``."""
    from diffusers import StableDiffusionPipeline

    from .storage import atomic_dir

    t0 = time.perf_counter()
    teacher = StableDiffusionPipeline.from_pretrained(str(teacher_dir), safety_checker=None, requires_safety_checker=False)
    pipe, stats = distill_lcm(teacher, spec, progress=progress)
    grids = {}
    for steps in (2, 4, 8):
        images, acc = evaluate_lcm_digits(pipe, steps=steps, seed=spec.seed)
        stats[f"prompt_following_accuracy_{steps}_steps"] = acc
        grids[steps] = images
    stats["total_seconds"] = time.perf_counter() - t0
    stats["spec"] = asdict(spec)
    stats["teacher"] = str(teacher_dir)
    stats["torch_threads"] = torch.get_num_threads()
    with atomic_dir(Path(out_dir)) as tmp:
        pipe.save_pretrained(tmp)
        save_grid(grids[4], tmp / "samples.png", nrow=8)
        (tmp / "build.json").write_text(json.dumps(stats, indent=2))
    return stats
