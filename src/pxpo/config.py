"""One typed, validated config; ``params.yaml`` is its single source.

Sections mirror the stages: ``model``, ``prompts``, ``sample``, ``reward``,
``train``, plus top-level ``seed`` and ``output_dir``. The CLI, DVC stages and
KFP components all build a :class:`Config` with :func:`load_config`, then apply
``section.field=value`` overrides from the command line.

Sizes are PER PROCESS (per GPU under ``accelerate launch``) unless a field
says otherwise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import PxpoInputError


@dataclass
class ModelConfig:
    path: str = "models/base"  # diffusers pipeline directory or hub id (SD 1.x/2.x)
    revision: str | None = None  # hub revision (branch, tag or commit)
    variant: str | None = None  # weight variant to load, e.g. "fp16"
    dtype: str = "auto"  # "auto" (fp32 on CPU, fp16 on CUDA), "float32", "float16", "bfloat16"


@dataclass
class PromptConfig:
    source: str = "digits"  # "digits" (embedded: "a handwritten digit N") or a .txt/.jsonl file
    negative_prompt: str = ""  # uncond text for classifier-free guidance (same at train time)


@dataclass
class SampleConfig:
    sampler: str = "ddim"  # "ddim" (stochastic DDIM, eta > 0) or "lcm" (multi-step consistency sampling, RLCM)
    num_steps: int = 20  # denoising steps T (DDIM: 20-50; LCM: 2-8)
    eta: float = 1.0  # DDIM stochasticity; must be > 0 to train on the samples
    guidance_scale: float = 3.0  # classifier-free guidance w (<= 1 disables CFG)
    batch_size: int = 32  # samples per UNet batch, per process
    num_batches: int = 1  # batches per epoch, per process (samples/epoch = batch_size * num_batches * processes)


@dataclass
class RewardConfig:
    name: str = "brightness_target"  # a labeller in pxpo.core.rewards.REGISTRY
    kwargs: dict[str, Any] = field(default_factory=lambda: {"layout": "left_bright"})


@dataclass
class TrainConfig:
    algorithm: str = "pxpo"  # "pxpo" (per-element advantages) or "ddpo" (scalar: the map's mean)
    loss: str = "ppo"  # "ppo" (clipped ratio) or "sf" (score function)
    ratio: str = "element"  # PXPO ratio: "element" or "mean" (DDPO's ratio, per-element advantage)
    baseline: str = "position"  # PXPO advantage baseline: "position" (mean map) or "scalar"
    epochs: int = 20  # outer epochs (sample -> label -> train)
    inner_epochs: int = 1  # passes over each epoch's samples
    batch_size: int = 8  # samples per training micro-batch, per process
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (times the trained timesteps)
    timestep_fraction: float = 1.0  # fraction of the T timesteps trained per sample
    learning_rate: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    clip_range: float = 1e-4  # PPO clip epsilon (a tuned parameter for per-element ratios)
    adv_clip_max: float = 5.0  # advantages clipped to +- this
    buffer_size: int = 32  # per-prompt reward buffer (stat tracking)
    min_count: int = 16  # buffered rewards before a prompt's own stats are used
    use_lora: bool = True  # LoRA on the UNet attention (else full fine-tuning)
    lora_rank: int = 4
    lora_alpha: float = 4.0
    mixed_precision: str = "auto"  # "auto" (fp16 on CUDA, none on CPU), "no", "fp16", "bf16"
    save_every: int = 5  # checkpoint every N epochs (and at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept


@dataclass
class PrepareConfig:
    input: str = "data/prompts.csv"  # raw prompts: .csv (prompt[,weight][,split]), .jsonl or .txt
    heldout_fraction: float = 0.2  # share of prompts WITHOUT an explicit split sent to held-out (stable hash)
    min_heldout: int = 1  # validation: at least this many held-out prompts
    max_heldout_fraction: float = 0.5  # validation: at most this share held out
    min_length: int = 1  # validation: prompt length bounds (characters)
    max_length: int = 300


@dataclass
class EvaluateConfig:
    samples_per_prompt: int = 8  # samples per held-out prompt (same seeds for base and policy)
    seed: int = 12345


@dataclass
class RegisterConfig:
    model_name: str = "pxpo-digits"  # MLflow registered model name
    experiment: str = "pxpo"  # MLflow experiment
    primary_metric: str = "reward_mean"  # evaluation metric that gates promotion
    higher_is_better: bool = True
    margin: float = 0.0  # challenger must beat the champion by more than this
    min_gain: float = 0.0  # and beat its own base model by more than this (reward_gain)


@dataclass
class PipelineConfig:
    rounds: int = 3  # KFP: unrolled rounds of sample -> label -> train (compile-time)
    epochs_per_round: int = 1  # epochs each train component runs (first from the stage's samples)


@dataclass
class Config:
    seed: int = 0
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def validate(self, source: str = "config") -> Config:
        """Check cross-field constraints; raise :class:`PxpoInputError` naming the field."""

        def bad(fieldname, problem, fix):
            raise PxpoInputError(f"{source}: {fieldname}", problem, fix)

        s, t = self.sample, self.train
        if s.num_steps < 1:
            bad("sample.num_steps", f"must be >= 1, got {s.num_steps}", "set a positive number of DDIM steps")
        if s.sampler not in ("ddim", "lcm"):
            bad("sample.sampler", f"unknown sampler {s.sampler!r}", "use ddim or lcm")
        if s.sampler == "lcm" and s.num_steps > 50:
            bad("sample.num_steps", f"{s.num_steps} consistency steps exceed the 50-step skipping schedule", "use 2-8 steps with sampler lcm")
        if s.sampler == "ddim" and not s.eta > 0:
            bad(
                "sample.eta",
                f"eta={s.eta} makes DDIM deterministic and the log-probability undefined",
                "set sample.eta > 0 (1.0 is the usual choice)",
            )
        for name in ("batch_size", "num_batches"):
            if getattr(s, name) < 1:
                bad(f"sample.{name}", f"must be >= 1, got {getattr(s, name)}", "set a positive integer")
        if t.batch_size < 1:
            bad("train.batch_size", f"must be >= 1, got {t.batch_size}", "set a positive integer")
        total = s.batch_size * s.num_batches
        if total % t.batch_size:
            bad(
                "train.batch_size",
                f"{t.batch_size} does not divide the {total} samples per epoch "
                f"(sample.batch_size {s.batch_size} x sample.num_batches {s.num_batches})",
                "choose train.batch_size dividing sample.batch_size * sample.num_batches",
            )
        if (total // t.batch_size) % t.gradient_accumulation_steps:
            bad(
                "train.gradient_accumulation_steps",
                f"{t.gradient_accumulation_steps} does not divide the {total // t.batch_size} micro-batches per epoch",
                "choose gradient_accumulation_steps dividing (samples per epoch / train.batch_size)",
            )
        if not 0 < t.timestep_fraction <= 1:
            bad("train.timestep_fraction", f"must be in (0, 1], got {t.timestep_fraction}", "use e.g. 1.0 or 0.5")
        choices = {
            "algorithm": ("pxpo", "ddpo"),
            "loss": ("ppo", "sf"),
            "ratio": ("element", "mean"),
            "baseline": ("position", "scalar"),
            "mixed_precision": ("auto", "no", "fp16", "bf16"),
        }
        for name, allowed in choices.items():
            if getattr(t, name) not in allowed:
                bad(f"train.{name}", f"unknown value {getattr(t, name)!r}", f"use one of {', '.join(allowed)}")
        from .core.rewards import REGISTRY

        if self.reward.name not in REGISTRY:
            bad(
                "reward.name",
                f"unknown labeller {self.reward.name!r}",
                f"use one of {', '.join(sorted(REGISTRY))} (`pxpo labellers` lists them)",
            )
        if self.model.dtype not in ("auto", "float32", "float16", "bfloat16"):
            bad("model.dtype", f"unknown dtype {self.model.dtype!r}", "use auto, float32, float16 or bfloat16")
        for name in ("epochs", "inner_epochs", "buffer_size", "min_count", "save_every", "keep_checkpoints"):
            if getattr(t, name) < 1:
                bad(f"train.{name}", f"must be >= 1, got {getattr(t, name)}", "set a positive integer")
        if t.min_count > t.buffer_size:
            bad(
                "train.min_count",
                f"min_count {t.min_count} exceeds buffer_size {t.buffer_size}, so a prompt's stats would never be used",
                "set train.min_count <= train.buffer_size",
            )
        if not t.learning_rate > 0 or not t.clip_range > 0 or not t.max_grad_norm > 0:
            bad("train.learning_rate/clip_range/max_grad_norm", "must be > 0", "set positive values")
        if self.train.use_lora and t.lora_rank < 1:
            bad("train.lora_rank", f"must be >= 1, got {t.lora_rank}", "set a positive rank or train.use_lora=false")
        pr = self.prepare
        if not 0 <= pr.heldout_fraction < 1:
            bad("prepare.heldout_fraction", f"must be in [0, 1), got {pr.heldout_fraction}", "use e.g. 0.2")
        if self.evaluate.samples_per_prompt < 1:
            bad("evaluate.samples_per_prompt", "must be >= 1", "set a positive integer")
        if self.pipeline.rounds < 1 or self.pipeline.epochs_per_round < 1:
            bad("pipeline.rounds/epochs_per_round", "must be >= 1", "set positive integers")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise PxpoInputError(where, f"expected a mapping, got {type(data).__name__}", "write key: value pairs")
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise PxpoInputError(
                f"{where}.{key}" if where else key,
                "unknown field",
                f"use one of {', '.join(sorted(known))}",
            )
        default = known[key].default_factory() if known[key].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            kwargs[key] = _build(type(default), value, f"{where}.{key}" if where else key)
        else:
            kwargs[key] = _coerce(value, known[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _coerce(value, f: dataclasses.Field, where: str):
    typ = str(f.type)
    if value is None:
        if "None" in typ:
            return None
        raise PxpoInputError(where, "must not be empty", "give a value")
    try:
        if typ == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if typ.startswith("str"):
            return str(value)
        if typ.startswith("dict") and not isinstance(value, dict):
            raise ValueError
    except (TypeError, ValueError):
        raise PxpoInputError(where, f"{value!r} is not a valid {typ}", f"give a {typ} value") from None
    return value


def _set_dotted(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise PxpoInputError(dotted, f"{k} is not a section", "override a field inside a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the config from ``params.yaml`` (if given/existing) and ``key=value`` overrides.

    Only the known sections are read; other top-level sections of params.yaml
    (used by later pipeline stages) are ignored. Values of overrides are parsed
    as YAML (``train.lr=1e-4``, ``reward.kwargs={layout: top_bright}``).
    """
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise PxpoInputError(str(p), "params file not found", "pass an existing params.yaml with --params")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise PxpoInputError(str(p), f"not valid YAML ({e})", "fix the YAML syntax") from None
        if not isinstance(raw, dict):
            raise PxpoInputError(str(p), "top level must be a mapping of sections", "write `train:` etc. sections")
        known = {f.name for f in dataclasses.fields(Config)}
        data = {k: v for k, v in raw.items() if k in known}
        source = str(p)
    for item in overrides or []:
        if "=" not in item:
            raise PxpoInputError(f"override {item!r}", "expected section.field=value", "write e.g. train.epochs=5")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        _set_dotted(data, key.strip(), parsed)
    return _build(Config, data, "").validate(source)


def dump_config(cfg: Config) -> str:
    """The config as params.yaml text (sections in order)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
