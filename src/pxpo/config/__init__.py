"""One typed, validated config; ``params.yaml`` is its single source.

Sections mirror the stages (``model``, ``prompts``, ``sample``, ``reward``, ``label``, ``train``, ``base``, ``prepare``,
``evaluate``, ``register``, ``pipeline``) plus top-level ``seed`` and ``output_dir``. The CLI, DVC stages and
KFP components build a :class:`Config` with :func:`load_config`, which applies ``section.field=value``
overrides. Each section is a pydantic model forbidding unknown keys; a bad value, unknown key or override
is a :class:`~pxpo.errors.PxpoInputError` naming the file (or "command line"), the dotted field and the fix.
Sizes are PER PROCESS (per GPU under ``accelerate launch``) unless a field says otherwise.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, ValidationInfo, model_validator

from .checks import Absent, Float, Int, Str, _fail, _is_model, choose, input_error
from .rewards import LabellerSpec, RewardComponent, RewardConfig, check_gold  # noqa: F401  (re-exported)
from ..errors import PxpoInputError


class _Section(BaseModel):
    """Base of every config model: unknown keys forbidden, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as e:
            section = _SECTION_OF.get(type(self))
            raise input_error(e, "assignment", Config, prefix=(section,) if section else ()) from None


class ModelConfig(_Section):
    path: Str = Field("models/base", description="The diffusers pipeline directory or hub id (SD 1.x/2.x).")
    revision: Str | None = Field(None, description="The hub revision (branch, tag or commit).")
    variant: Str | None = Field(None, description='The weight variant to load, e.g. "fp16".')
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description='The weight dtype; "auto" is fp32 on CPU, fp16 on CUDA.')


class PromptConfig(_Section):
    source: Str = Field("digits", description='"digits" (embedded "a handwritten digit N" prompts) or a .txt/.jsonl file.')
    negative_prompt: Str = Field("", description="The uncond text for classifier-free guidance (the same at train time).")


class SampleConfig(_Section):
    sampler: Literal["ddim", "lcm", "flow_sde"] = Field("ddim", description='"ddim" (stochastic DDIM, eta > 0), "lcm" (multi-step consistency sampling, RLCM) or "flow_sde" (Flow-GRPO\'s SDE, SD3-class flow models).')
    num_steps: Int = Field(20, ge=1, description="The denoising steps T (DDIM: 20-50; LCM: 2-8).")
    eta: Float = Field(1.0, description="The DDIM stochasticity, which must be > 0 to train on the samples.")
    guidance_scale: Float = Field(3.0, description="The classifier-free guidance scale w (<= 1 disables CFG).")
    batch_size: Int = Field(32, ge=1, description="Samples per UNet batch, GLOBAL: each of N processes rolls out batch_size / N at a time.")
    num_batches: Int = Field(1, ge=1, description="Batches per epoch (samples/epoch = batch_size * num_batches, global: the same for any number of processes).")
    compute_batch: Int | Literal["auto"] = Field("auto", description='Samples per UNet call of sampling, per process (any size: samples are independent); "auto": the largest that fits the free GPU memory (on CPU: batch_size / N).')
    noise_level: Float = Field(0.7, ge=0, description="flow_sde: Flow-GRPO's noise level a (sigma_t = a sqrt(t / (1 - t))); 0 samples the ODE (NFT only).")
    max_sequence_length: Int = Field(256, ge=1, le=512, description="SD3-class models: the T5 tokens each prompt is encoded to (diffusers' default 256). Flow-GRPO trains with 128; the transformer's joint attention grows with it (README, Flow models: a Flow-GRPO epoch took 1.58x as long at 256 as at 128). Ignored by SD 1.x/2.x and SDXL.")
    sde_window_start: Int = Field(0, ge=0, description="flow_sde: the first SDE step (steps outside the window are ODE steps and not trained).")
    sde_window_size: Int = Field(0, ge=0, description="flow_sde: SDE steps from sde_window_start (0: every step; 1-2: Flow-GRPO-Fast / MixGRPO).")
    group_size: Int = Field(1, ge=1, description="Samples per drawn prompt in an epoch (GRPO's G; train.advantage_mode=group normalises within these groups).")
    pairs: StrictBool = Field(False, description="Draw aligned pairs (issue 24): samples 2i (A) and 2i+1 (B) share a prompt and the initial noise, and the first pair_shared_steps steps; needed by the preference algorithms (train.algorithm d3po / diffusion_dpo).")
    pair_shared_steps: Int = Field(0, ge=0, description="sample.pairs: the denoising steps A and B share (same step noise) before they branch; 0 shares only the initial noise. More shared steps: images that differ more locally.")

    @property
    def prompt_group(self) -> int:
        """Samples per drawn prompt: group_size, at least 2 with pairs (a pair is one prompt)."""
        return max(self.group_size, 2) if self.pairs else self.group_size

    @model_validator(mode="after")
    def _check(self) -> SampleConfig:
        if self.compute_batch != "auto" and self.compute_batch < 1:
            raise _fail("compute_batch", f"must be >= 1 or auto, got {self.compute_batch}", 'set sample.compute_batch to a positive size or "auto"')
        if self.sampler == "lcm" and self.num_steps > 50:
            raise _fail("num_steps", f"{self.num_steps} consistency steps exceed the 50-step skipping schedule", "use 2-8 steps with sampler lcm")
        if self.sampler == "ddim" and not self.eta > 0:
            raise _fail("eta", f"eta={self.eta} makes DDIM deterministic and the log-probability undefined", "set sample.eta > 0 (1.0 is the usual choice)")
        if self.sampler == "flow_sde" and self.sde_window_size and self.sde_window_start + self.sde_window_size > self.num_steps:
            problem = f"a window of {self.sde_window_size} SDE steps from step {self.sde_window_start} does not fit in {self.num_steps} steps"
            raise _fail("sde_window_start", problem, "choose sample.sde_window_start + sample.sde_window_size <= sample.num_steps")
        if self.pairs and self.prompt_group % 2:
            raise _fail("group_size", f"{self.group_size} samples per prompt cannot hold whole pairs", "set sample.group_size to an even number (or 1: pairs of one prompt)")
        if self.pairs and self.pair_shared_steps >= self.num_steps:
            raise _fail("pair_shared_steps", f"{self.pair_shared_steps} shared steps of {self.num_steps} leave A and B identical", "set sample.pair_shared_steps < sample.num_steps")
        return self


class LabelConfig(_Section):
    """Who labels: the reward labeller (``model``) or people in Label Studio (``human``; docs/labelling.md)."""

    mode: Literal["model", "human"] = Field("model", description='"model" (reward.name labels every sample) or "human" (pxpo label-studio push / pull).')
    url: Str = Field("http://localhost:8080", description="The Label Studio server.")
    token_env: Str = Field("LABEL_STUDIO_API_KEY", description="The environment variable holding the Label Studio API token (never the token itself).")
    project: Str = Field("pxpo", description="The Label Studio project title (created by push when absent).")
    strengths: dict[str, float] = Field(default_factory=lambda: {"good": 1.0, "bad": -1.0}, description="Brush label -> the reward of the pixels it paints.")
    neutral: Float = Field(0.0, description="The reward of unpainted pixels.")
    pre_annotate: StrictBool = Field(True, description="push: pre-paint each sample from reward.name's map (top third good, bottom third bad).")
    missing: Literal["reject", "skip", "neutral"] = Field("reject", description='pull, for a sample nobody annotated: "reject" (exit 2), "skip" (left out of --out) or "neutral" (a neutral map).')

    @model_validator(mode="after")
    def _check(self) -> LabelConfig:
        if not self.strengths:
            raise _fail("strengths", "no brush labels", "give e.g. {good: 1.0, bad: -1.0}")
        return self

class TrainConfig(_Section):
    algorithm: Literal["pxpo", "ddpo", "nft", "nft_scalar", "d3po", "diffusion_dpo"] = Field("pxpo", description='"pxpo" (per-element advantages), "ddpo" (scalar: the map\'s mean), "nft" (pixel-wise DiffusionNFT, flow_sde sampler), "nft_scalar" (DiffusionNFT on the map\'s mean), "d3po" (region-level D3PO on the sampler\'s aligned pairs) or "diffusion_dpo" (region-level Diffusion-DPO on pairs of images; ddim or flow_sde). The last two need sample.pairs (docs/algorithms.md, "Region-level preferences").')
    preference_map: Literal["region", "whole"] = Field("region", description='d3po / diffusion_dpo: "region" (the preference map m weights each latent element) or "whole" (one preference per pair, sign(mean m), constant over the image: D3PO / Diffusion-DPO exactly).')
    preference_beta: Float = Field(0.1, gt=0, description="d3po: D3PO's beta in -log sigmoid(beta mean_e m_e (d_A,e - d_B,e)) (0.1 in D3PO's configs).")
    dpo_beta: Float = Field(2.5, gt=0, description="diffusion_dpo: Diffusion-DPO's beta; the loss uses beta x T (T: the scheduler's num_train_timesteps, 1000), 2.5 x 1000 = its SD 1.5 code's 0.5 x beta_dpo 5000.")
    advantage_mode: Literal["tracker", "group"] = Field("tracker", description='"tracker" (per-prompt buffers across epochs, DDPO) or "group" (GRPO: within this epoch\'s group of sample.group_size samples per prompt).')
    group_std: Literal["group", "global"] = Field("group", description='advantage_mode=group: the spread of each group\'s residuals, or one over the epoch (Flow-GRPO\'s global_std).')
    nft_beta: Float = Field(1.0, gt=0, description="DiffusionNFT's mixing coefficient beta of the implicit positive / negative policies.")
    nft_old_decay_rate: Float = Field(0.0, ge=0, description="DiffusionNFT's sampling policy: after each epoch old <- d old + (1 - d) current with d = min(rate x optimizer steps so far, train.nft_old_decay_max). 0 (default): the sampling policy is the current one (on-policy). DiffusionNFT's reference schedule: rate 0.001, max 0.5. `pxpo run` samples with the old weights; the staged pipeline samples the saved policy, so use 0 there.")
    nft_old_decay_max: Float = Field(0.5, ge=0, lt=1, description="The largest decay d of DiffusionNFT's soft-updated sampling policy (train.nft_old_decay_rate).")
    loss: Literal["ppo", "sf"] = Field("ppo", description='"ppo" (clipped ratio) or "sf" (score function).')
    ratio: Literal["element", "mean"] = Field("element", description='The PXPO ratio: "element" or "mean" (DDPO\'s ratio, per-element advantage).')
    baseline: Literal["position", "scalar"] = Field("position", description='The PXPO advantage baseline: "position" (mean map) or "scalar".')
    epochs: Int = Field(20, ge=1, description="Outer epochs (sample -> label -> train).")
    inner_epochs: Int = Field(1, ge=1, description="Passes over each epoch's samples.")
    batch_size: Int = Field(8, ge=1, description="Samples per training micro-batch, GLOBAL: each of N processes trains on batch_size / N of them (DDP averages).")
    gradient_accumulation_steps: Int = Field(1, ge=1, description="Global micro-batches per optimizer step (times the trained timesteps); the same for any N.")
    timestep_fraction: Float = Field(1.0, gt=0, le=1, description="The fraction of the T timesteps trained per sample.")
    learning_rate: Float = Field(3e-4, gt=0, description="The AdamW learning rate.")
    adam_beta1: Float = Field(0.9, description="The AdamW first-moment decay.")
    adam_beta2: Float = Field(0.999, description="The AdamW second-moment decay.")
    weight_decay: Float = Field(1e-4, description="The AdamW weight decay.")
    adam_epsilon: Float = Field(1e-8, description="The AdamW epsilon.")
    max_grad_norm: Float = Field(1.0, gt=0, description="Gradients are clipped to this global norm.")
    clip_range: Float = Field(
        1e-4,
        gt=0,
        description="The PPO clip epsilon of the MEAN ratio (DDPO; ratio: mean); per-element ratios are clipped at clip_range * sqrt(C*h*w), "
        "so one value clips about the same share for both at any latent size (docs/algorithms.md). Aim for a first-epoch "
        "clipfrac_element of 5-30 %.",
    )
    adv_clip_max: Float = Field(5.0, description="Advantages are clipped to +- this.")
    buffer_size: Int = Field(32, ge=1, description="The per-prompt reward buffer (stat tracking).")
    min_count: Int = Field(16, ge=1, description="Buffered rewards needed before a prompt's own stats are used.")
    use_lora: StrictBool = Field(True, description="LoRA on the UNet attention (else full fine-tuning).")
    lora_rank: Int = Field(4, description="The LoRA rank.")
    lora_alpha: Float = Field(4.0, description="The LoRA alpha (scale = alpha / rank).")
    compute_batch: Int | Literal["auto"] = Field("auto", description='(sample, timestep) pairs per UNet call of training, per process (the gradient is unchanged); "auto": the largest that fits the free GPU memory (on CPU: batch_size / N).')
    compile: StrictBool = Field(False, description="torch.compile the UNet for sampling and training (CUDA; the first epoch pays the compilation).")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field("auto", description='"auto" (fp16 on CUDA, none on CPU), "no", "fp16" or "bf16".')
    save_every: Int = Field(5, ge=1, description="A checkpoint is saved every N epochs (and at the end).")
    keep_checkpoints: Int = Field(2, ge=1, description="The newest checkpoints kept.")
    tracker_max_mb: Float = Field(256.0, gt=0, description="Bound on the per-prompt reward buffers (float32 MB); least recently seen prompts are dropped past it.")
    max_log_ratio: Float = Field(20.0, gt=0, description="Per-element log-ratios are clamped to +- this before exp() (no inf / NaN far off-policy).")
    max_skipped_steps: Int = Field(5, ge=0, description="Optimizer steps skipped for a non-finite loss or gradient before the run stops and rolls back.")
    grad_spike_factor: Float = Field(100.0, ge=0, description="Stop and roll back when a gradient norm exceeds this times its running median (0: off).")
    probe_every: Int = Field(5, ge=0, description="Every N epochs (0: off): log the drift from the base model on a fixed probe batch, and images at that "
                                 "epoch's step: the probe batch's base-vs-policy grid (probe_samples) and the mean reward map (reward_map_mean).")
    probe_samples: Int = Field(8, ge=1, description="Samples in the drift probe batch (fixed prompts and seeds).")
    kl_coef: Float = Field(0.0, ge=0, description="Weight of the per-element KL to the reference policy in the loss (0: off, today's loss exactly).")
    ratio_warn: Float | None = Field(None, gt=0, description="Warn once when the first update's worst |ratio - 1| exceeds this (None: by precision).")
    ratio_stop: Float | None = Field(None, gt=0, description="Stop when the first update's worst |ratio - 1| exceeds this: a sampler/trainer mismatch (None: by precision).")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.compute_batch != "auto" and self.compute_batch < 1:
            raise _fail("compute_batch", f"must be >= 1 or auto, got {self.compute_batch}", 'set train.compute_batch to a positive size or "auto"')
        if self.min_count > self.buffer_size:
            problem = f"min_count {self.min_count} exceeds buffer_size {self.buffer_size}, so a prompt's stats would never be used"
            raise _fail("min_count", problem, "set train.min_count <= train.buffer_size")
        if self.use_lora and self.lora_rank < 1:
            raise _fail("lora_rank", f"must be >= 1, got {self.lora_rank}", "set a positive rank or train.use_lora=false")
        return self


class BaseConfig(_Section):
    vae_steps: Int = Field(600, ge=0, description="VAE pretraining steps of `pxpo base build` (DVC stage base).")
    unet_steps: Int = Field(3000, ge=0, description="UNet + text encoder pretraining steps of `pxpo base build`.")
    lcm_steps: Int = Field(1000, ge=0, description="Consistency distillation steps into models/lcm (sampler lcm).")


class PrepareConfig(_Section):
    input: Str = Field("data/prompts.csv", description="The raw prompts: .csv (prompt[,weight][,split]), .jsonl or .txt.")
    heldout_fraction: Float = Field(0.2, ge=0, lt=1, description="The share of prompts WITHOUT an explicit split sent to held-out (stable hash).")
    min_heldout: Int = Field(1, description="Validation requires at least this many held-out prompts.")
    max_heldout_fraction: Float = Field(0.5, description="Validation allows at most this share held out.")
    min_length: Int = Field(1, description="Validation: the shortest allowed prompt (characters).")
    max_length: Int = Field(300, description="Validation: the longest allowed prompt (characters).")


class EvaluateConfig(_Section):
    samples_per_prompt: Int = Field(8, ge=1, description="Samples per held-out prompt (the same seeds for base and policy).")
    seed: Int = Field(12345, description="The seed of the evaluation samples.")
    gold: list[LabellerSpec] = Field(default_factory=list, description="Gold rewards training never sees, reported for base and policy (register.max_gold_drop gates on them).")


class RegisterConfig(_Section):
    model_name: Str = Field("pxpo-digits", description="The MLflow registered model name.")
    experiment: Str = Field("pxpo", description="The MLflow experiment.")
    primary_metric: Str = Field("reward_mean", description="The evaluation metric that gates promotion.")
    higher_is_better: StrictBool = Field(True, description="Whether a larger primary metric is better.")
    margin: Float = Field(0.0, description="The challenger must beat the champion by more than this.")
    min_gain: Float = Field(0.0, description="The challenger must also beat its own base model by more than this (reward_gain).")
    max_drift: Float | None = Field(None, description="Refuse promotion when the evaluation's drift_pixel_l1 from the base model exceeds this (None: off).")
    max_gold_drop: Float | None = Field(None, description="Refuse promotion when a gold reward (evaluate.gold) of the policy is lower than the base's by more than this (None: off).")


class PipelineConfig(_Section):
    rounds: Int = Field(3, ge=1, description="KFP: unrolled rounds of sample -> label -> train (compile-time).")
    epochs_per_round: Int = Field(1, ge=1, description="Epochs each train component runs (the first from the stage's samples).")


def _check_flow_and_groups(s: SampleConfig, t: TrainConfig, total: int) -> None:
    """Cross-section checks of the flow sampler, NFT and GRPO groups (issue 15)."""
    from .algorithms import algorithm  # the registry of train.algorithm

    row = algorithm(t.algorithm)
    nft = row.forward_process  # trains on the forward process: no sampler log-probs
    if row.samplers and s.sampler not in row.samplers:
        raise _fail("train.algorithm", f"{t.algorithm} trains on the forward process of {' or '.join(row.samplers)} models, not a {s.sampler} sampler", f"set sample.sampler={row.samplers[-1]}")
    if row.pairs and not s.pairs:
        raise _fail("sample.pairs", f"{t.algorithm} trains on aligned pairs of samples", "set sample.pairs=true")
    if row.pairs and t.batch_size % 2:
        raise _fail("train.batch_size", f"{t.algorithm} trains on whole pairs: {t.batch_size} samples per micro-batch split one", "set an even train.batch_size")
    if s.sampler == "flow_sde" and not nft and not s.noise_level > 0:
        raise _fail("sample.noise_level", "noise level 0 samples the ODE: no step has a log-probability to train by policy gradient", "set sample.noise_level > 0 (0.7 is Flow-GRPO's), or train.algorithm=nft")
    if total % s.prompt_group:
        raise _fail("sample.group_size", f"{s.prompt_group} does not divide the {total} samples per epoch", "choose sample.group_size dividing sample.batch_size * sample.num_batches")
    if t.advantage_mode == "group" and s.group_size < 2:
        raise _fail("sample.group_size", "group-relative advantages need at least 2 samples per prompt", "set sample.group_size >= 2 (e.g. 4-16) or train.advantage_mode=tracker")


# The field `register` shadows ABCMeta.register of the model class, which nothing here uses.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)

    class Config(_Section):
        """The whole configuration: params.yaml's top-level keys, each section a model."""

        seed: Int = Field(0, description="The seed of prompts, noise and LoRA initialisation.")
        output_dir: Str = Field("runs/default", description="The run directory (metrics, checkpoints, policy).")
        model: ModelConfig = Field(default_factory=ModelConfig)
        prompts: PromptConfig = Field(default_factory=PromptConfig)
        sample: SampleConfig = Field(default_factory=SampleConfig)
        reward: RewardConfig = Field(default_factory=RewardConfig)
        label: LabelConfig = Field(default_factory=LabelConfig)
        train: TrainConfig = Field(default_factory=TrainConfig)
        base: BaseConfig = Field(default_factory=BaseConfig)
        prepare: PrepareConfig = Field(default_factory=PrepareConfig)
        evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
        register: RegisterConfig = Field(default_factory=RegisterConfig)
        pipeline: PipelineConfig = Field(default_factory=PipelineConfig)

        @model_validator(mode="after")
        def _check(self, info: ValidationInfo) -> Config:
            s, t = self.__dict__["sample"], self.__dict__["train"]
            sections = (info.context or {}).get("sections")
            check_gold(self.__dict__, sections)  # evaluate.gold vs reward and register.max_gold_drop
            if isinstance(s, Absent) or isinstance(t, Absent) or (sections is not None and not {"sample", "train"} <= sections):
                return self  # a restricted task: the full params were checked when the pipeline was compiled
            total = s.batch_size * s.num_batches
            if total % t.batch_size:
                problem = f"{t.batch_size} does not divide the {total} samples per epoch (sample.batch_size {s.batch_size} x sample.num_batches {s.num_batches})"
                raise _fail("train.batch_size", problem, "choose train.batch_size dividing sample.batch_size * sample.num_batches")
            if (total // t.batch_size) % t.gradient_accumulation_steps:
                problem = f"{t.gradient_accumulation_steps} does not divide the {total // t.batch_size} micro-batches per epoch"
                raise _fail("train.gradient_accumulation_steps", problem, "choose gradient_accumulation_steps dividing (samples per epoch / train.batch_size)")
            _check_flow_and_groups(s, t, total)
            return self

        def __getattribute__(self, name: str):
            value = super().__getattribute__(name)
            if type(value) is Absent and name in _SCALARS:
                raise value.error()
            return value

        def to_dict(self) -> dict:
            """Plain nested dict of the config (only the passed sections of a restricted config)."""
            return self.model_dump()

        def model_dump(self, **kwargs) -> dict:  # a restricted config dumps its passed keys only
            return super().model_dump(**{"include": {k for k, v in self.__dict__.items() if type(v) is not Absent}, **kwargs})


KEYS = tuple(Config.model_fields)  # the top-level keys of params.yaml, in order
_SCALARS = frozenset(k for k, f in Config.model_fields.items() if not _is_model(f.annotation))  # seed, output_dir
_SECTION_OF = {f.annotation: k for k, f in Config.model_fields.items() if k not in _SCALARS}  # TrainConfig -> "train"


def _set_dotted(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = data
    for i, k in enumerate(keys[:-1]):
        node = node.setdefault(k, {})
        if not isinstance(node, dict) or (i == 0 and k in _SCALARS):
            raise PxpoInputError(f"command line: {dotted}", f"{'.'.join(keys[: i + 1])} is not a section", "override a field inside a section")
    node[keys[-1]] = value


def _check_sections(sections: Iterable[str]) -> frozenset[str]:
    sections = frozenset([sections] if isinstance(sections, str) else sections)
    for name in sorted(sections - set(KEYS)):
        raise PxpoInputError(f"sections: {name}", "unknown section", choose(name, KEYS))
    return sections


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *, sections: Iterable[str] | None = None) -> Config:
    """Build the config from ``params.yaml`` (if given) and ``section.field=value`` overrides.

    Values of overrides are parsed as YAML (``train.learning_rate=1e-4``,
    ``reward.kwargs={layout: top_bright}``). Unknown keys anywhere are errors.

    ``sections`` (e.g. ``{"seed", "model", "prompts", "sample"}``) restricts the result to those
    top-level keys, for a Kubeflow task given only its sections: the others become stand-ins
    that raise :class:`PxpoInputError` when used (a scalar such as ``seed`` when read), and
    ``to_dict``/``dump_config`` leave them out. Checks spanning a missing section are skipped.
    """
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise PxpoInputError(str(p), "params file not found", "pass an existing params.yaml with --params")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise PxpoInputError(str(p), f"not valid YAML ({e})", "fix the YAML syntax") from None
        if not isinstance(data, dict):
            raise PxpoInputError(str(p), "top level must be a mapping of sections", "write `train:` etc. sections")
        source = str(p)
    overridden = []
    for item in overrides or []:
        if "=" not in item:
            raise PxpoInputError(f"command line: {item!r}", "expected section.field=value", "write e.g. train.epochs=5")
        key, value = (s.strip() for s in item.split("=", 1))
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        _set_dotted(data, key, parsed)
        overridden.append(key)
    sections = _check_sections(sections) if sections is not None else None
    try:
        cfg = Config.model_validate(data, context={"sections": sections})
    except ValidationError as e:
        raise input_error(e, source, Config, overridden=overridden) from None
    if sections is not None:
        for key in KEYS:
            if key not in sections:
                cfg.__dict__[key] = Absent(key)
    return cfg


def dump_config(cfg: Config) -> str:
    """The config as params.yaml text (sections in order; only the passed ones if restricted)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def section_yaml(data_or_cfg: Mapping | Config | str, sections: Iterable[str]) -> str:
    """YAML text of only the ``sections`` top-level keys of a params mapping, YAML text or config.

    The pipeline gives each task this instead of the whole params.yaml; a task
    then loads it with ``load_config(path, sections=...)``. Keys absent from the
    input are left out (the task uses their defaults).
    """
    sections = _check_sections(sections)
    src = data_or_cfg
    data = src.to_dict() if isinstance(src, Config) else (yaml.safe_load(src) or {}) if isinstance(src, str) else dict(src)
    if not isinstance(data, dict):
        raise PxpoInputError("params", "top level must be a mapping of sections", "write `train:` etc. sections")
    return yaml.safe_dump({k: v for k, v in data.items() if k in sections}, sort_keys=False)
