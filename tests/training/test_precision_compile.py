"""bf16, TF32 and the opt-in torch.compile (issue 9 item 3), on CPU where possible.

* sampling under bf16 autocast gives finite trajectories whose stored
  log-probs the same autocast re-scores exactly (identical batches);
* ``train.mixed_precision=bf16`` trains (finite metrics, ratio near 1);
* ``train.compile=true`` makes both sampling and training call the compiled
  network (wiring only: a spy stands in for torch.compile);
* on CUDA, TF32 is switched on by build_train_state.
"""

import json

import pytest
import torch

from pxpo.config import load_config
from pxpo.stages.online import run_online as run
from pxpo.tracking import JsonlTracker

FAST = ["sample.batch_size=4", "sample.num_steps=3", "train.batch_size=2", "train.learning_rate=1e-2", "train.clip_range=0.1",
        "train.epochs=1", "train.probe_every=0"]


def test_sampling_under_bf16_autocast_rescoring_matches(tiny_pipe):
    from pxpo.core.policies import make_policy
    from pxpo.training.rollout import sample_trajectories

    cfg = load_config(None, ["sample.num_steps=3"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        traj = sample_trajectories(tiny_pipe, cfg, ["a handwritten digit 1"] * 2, [0, 1])
    assert torch.isfinite(traj.latents).all() and torch.isfinite(traj.log_probs).all()
    assert traj.latents.dtype == torch.float32 and traj.log_probs.dtype == torch.float32
    policy = make_policy(cfg.sample, tiny_pipe.scheduler)
    den = policy.denoiser(tiny_pipe.unet)
    worst = 0.0
    for j in range(3):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = policy.log_prob(den, traj.latents[:, j], torch.full((2,), j), traj.latents[:, j + 1], traj.cond(), traj.uncond())
        worst = max(worst, (out.log_prob - traj.log_probs[:, j]).abs().max().item())
    assert worst < 1e-3  # same inputs, same batch: the same bf16 network outputs


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate's state is per process and fixes mixed precision at the first Accelerator: start and leave it clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_bf16_mixed_precision_trains(tmp_path, tiny_model_dir, fresh_accelerate_state):
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"output_dir={tmp_path}", *FAST, "train.mixed_precision=bf16"])
    run(cfg, JsonlTracker(tmp_path), progress=False)
    h = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert h["optimizer_steps"] == 2 and abs(h["ratio"] - 1) < 0.1 and h["grad_norm"] == h["grad_norm"]


def test_compile_flag_is_wired(tmp_path, tiny_model_dir, monkeypatch):
    import pxpo.models

    calls = {}

    class Spy(torch.nn.Module):
        def __init__(self, inner, name):
            super().__init__()
            self._orig_mod, self.name = inner, name  # torch.compile's wrapper names its module so

        def forward(self, *a, **k):
            calls[self.name] = calls.get(self.name, 0) + 1
            return self._orig_mod(*a, **k)

    made = []

    def fake_compile(net):
        made.append(net)
        return Spy(net, f"net{len(made)}")

    monkeypatch.setattr(pxpo.models, "compile_network", fake_compile)
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"output_dir={tmp_path}", *FAST, "train.compile=true"])
    run(cfg, JsonlTracker(tmp_path), progress=False)
    assert len(made) == 2  # the training network and the unwrapped sampling one
    assert calls.get("net1", 0) == 2 * 3  # training: 2 steps x 3 chunks (compute batch = micro-batch on CPU)
    assert calls.get("net2", 0) == 3  # sampling: 3 steps of one batch of 4


def test_compile_is_off_by_default():
    assert load_config(None, []).train.compile is False


@pytest.mark.gpu
def test_tf32_on_for_cuda(tmp_path, tiny_model_dir):
    from pxpo.training.state import build_train_state

    torch.backends.cuda.matmul.allow_tf32 = False
    build_train_state(load_config(None, [f"model.path={tiny_model_dir}", f"output_dir={tmp_path}", *FAST]))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
