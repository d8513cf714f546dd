"""Compute batches apart from the algorithm's batches (issue 9 item 2) and the host-sync budget (item 3).

* Training at any compute batch (one pair per call, uneven chunks, a whole
  optimizer step in one call) gives the parameters of the one-micro-batch-per-
  call loop after two epochs, to fp32 tolerance; sampling at any compute batch
  gives the same samples.
* An out-of-memory error halves the compute batch with a warning and redoes
  the work: the run's parameters are those of a run without the error.
* The host reads the device once per optimizer step, not once per chunk.
"""

import sys
import warnings
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pxpo
from pxpo.training.compute_batch import ComputeBatch, is_oom, pick_compute_batch
from pxpo.config import load_config
from pxpo.stages.online import run_online as run
from pxpo.tracking import JsonlTracker

# As tests/training/test_distributed.py: adam_epsilon=1 keeps Adam's update linear in the gradient (with 1e-8 the first
# update is +-lr for every element, so float summation order would show); no clipping.
FAST = ["sample.batch_size=4", "sample.num_steps=3", "train.batch_size=2", "train.gradient_accumulation_steps=2",
        "train.learning_rate=0.1", "train.clip_range=0.1", "train.min_count=2", "train.buffer_size=4", "train.epochs=2",
        "train.adam_epsilon=1", "train.max_grad_norm=1000", "train.probe_every=0"]
TOL = 1e-5


def _run(model_dir, out, *extra):
    cfg = load_config(None, [f"model.path={model_dir}", f"output_dir={out}", *FAST, *extra])
    run(cfg, JsonlTracker(out), progress=False)
    return load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """One micro-batch (2 samples at one permuted timestep each) per UNet call: the loop before compute batches."""
    return _run(tiny_model_dir, tmp_path_factory.mktemp("ref"), "train.compute_batch=2", "sample.compute_batch=4")


@pytest.mark.parametrize("train_cb,sample_cb", [(1, 1), (5, 3), (12, 4), ("auto", "auto")])
def test_any_compute_batch_gives_the_same_parameters(tmp_path, tiny_model_dir, reference, train_cb, sample_cb):
    # 2 micro-batches x 3 timesteps x 2 samples = 12 pairs per optimizer step: 12 calls, 3 uneven ones, or 1
    got = _run(tiny_model_dir, tmp_path, f"train.compute_batch={train_cb}", f"sample.compute_batch={sample_cb}")
    assert _max_diff(reference, got) < TOL
    assert any(v.abs().sum() > 0 for k, v in got.items() if "lora_B" in k or "lora.up" in k)  # it trained


def test_a_wrong_loss_scale_would_show(tmp_path, tiny_model_dir, reference, monkeypatch):
    """The equality above can fail: doubling every chunk's weight moves the parameters."""
    import pxpo.training.objectives

    real = pxpo.training.objectives.pxpo_loss  # the PXPO objective's loss (pxpo.training.objectives.PolicyGradient)

    def doubled(*a, **k):
        out = real(*a, **k)
        out.loss = out.loss * 2
        return out

    monkeypatch.setattr(pxpo.training.objectives, "pxpo_loss", doubled)
    got = _run(tiny_model_dir, tmp_path, "train.compute_batch=12")
    assert _max_diff(reference, got) > 100 * TOL


class _OOMAbove(torch.nn.Module):
    """Wraps a UNet; raises torch.cuda.OutOfMemoryError for a call of more than ``limit`` rows."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit, self.failures = inner, limit, 0

    def forward(self, x, *a, **k):
        if x.shape[0] > self.limit:
            self.failures += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return self.inner(x, *a, **k)


def test_training_falls_back_to_half_on_oom(tmp_path, tiny_model_dir, reference, monkeypatch):
    """train.compute_batch=12 with a network that fails above 6 rows (3 guided pairs): 12 -> 6 -> 3, same parameters."""
    import pxpo.training.step

    real_init = pxpo.training.step.StepRunner.__init__
    nets = []

    def init(self, state, *a, **k):
        real_init(self, state, *a, **k)
        self.ctx.denoiser.net = _OOMAbove(self.ctx.denoiser.net, 6)
        nets.append(self.ctx.denoiser.net)

    monkeypatch.setattr(pxpo.training.step.StepRunner, "__init__", init)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _run(tiny_model_dir, tmp_path, "train.compute_batch=12", "sample.compute_batch=4")
    msgs = [str(w.message) for w in caught if "train.compute_batch" in str(w.message)]
    assert msgs == ["train.compute_batch: out of memory at 12 per call; retrying at 6", "train.compute_batch: out of memory at 6 per call; retrying at 3"]
    assert nets[0].failures == 2 and nets[1].failures == 0  # the smaller size is kept for the rest of the run
    assert _max_diff(reference, got) < TOL


def test_sampling_falls_back_to_half_on_oom(tiny_pipe):
    from pxpo.training.rollout import sample_trajectories

    cfg = load_config(None, ["sample.num_steps=2", "sample.compute_batch=4"])
    prompts, seeds = ["a handwritten digit 1"] * 4, [0, 1, 2, 3]
    ref = sample_trajectories(tiny_pipe, cfg, prompts, seeds, batch_size=4)
    compute = ComputeBatch(4, "cpu", "sample.compute_batch")
    real = tiny_pipe.unet
    net = _OOMAbove(real, 4)  # 4 samples = 8 guided rows fail; 2 samples pass
    with pytest.warns(RuntimeWarning, match="sample.compute_batch: out of memory at 4 per call; retrying at 2"):
        got = sample_trajectories(tiny_pipe, cfg, prompts, seeds, compute=compute, network=net)
    assert compute.size == 2 and net.failures == 1
    torch.testing.assert_close(got.latents, ref.latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.log_probs, ref.log_probs, rtol=1e-4, atol=1e-3)


def test_compute_batch_run_retries_and_restarts():
    seen, restarts = [], []

    def fn(c):
        if c.stop - c.start > 2:
            raise torch.cuda.OutOfMemoryError("injected")
        seen.append((c.start, c.stop))
        return c.stop - c.start

    cb = ComputeBatch(8, "cpu", "x")
    with pytest.warns(RuntimeWarning) as rec:
        assert sum(cb.run(7, 8, fn)) == 7
    assert [str(w.message) for w in rec] == ["x: out of memory at 8 per call; retrying at 4", "x: out of memory at 4 per call; retrying at 2"]
    assert cb.size == 2 and seen == [(0, 2), (2, 4), (4, 6), (6, 7)]
    seen.clear()

    def flaky(c):  # the second chunk fails once: with restart, the work starts over from the first chunk
        if c.start == 2 and not restarts:
            raise torch.cuda.OutOfMemoryError("injected")
        seen.append((c.start, c.stop))

    cb = ComputeBatch(2, "cpu", "y")
    with pytest.warns(RuntimeWarning):
        cb.run(4, 2, flaky, restart=lambda: restarts.append(1))
    assert restarts == [1] and seen == [(0, 2), (0, 1), (1, 2), (2, 3), (3, 4)]


def test_other_errors_and_size_one_oom_are_raised():
    with pytest.raises(ValueError):
        ComputeBatch(4, "cpu", "x").run(4, 4, lambda c: (_ for _ in ()).throw(ValueError("bug")))
    with pytest.raises(torch.cuda.OutOfMemoryError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ComputeBatch(4, "cpu", "x").run(4, 4, lambda c: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("oom")))
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate")) and not is_oom(RuntimeError("shape mismatch"))


def test_auto_size_from_measured_memory():
    assert pick_compute_batch(64, per_item_bytes=1e9, available=10e9) == 8  # 0.85 * 10 GB / 1 GB
    assert pick_compute_batch(4, per_item_bytes=1e9, available=100e9) == 4  # never above the work
    assert pick_compute_batch(64, per_item_bytes=1e9, available=0.1e9) == 1
    cb = ComputeBatch("auto", "cpu", "x")  # on CPU, auto is the algorithm's size
    sizes = []
    cb.run(10, 4, lambda c: sizes.append(c.stop - c.start))
    assert sizes == [4, 4, 2]


PXPO_SOURCE = Path(pxpo.__file__).resolve().parent  # the imported package's own directory (src/pxpo in a checkout)


@lru_cache(maxsize=None)
def is_pxpo_code(filename: str) -> bool:
    """True for a module of the imported pxpo package, by where its file really is: not by a "pxpo" in the path,
    which a checkout named pxpo (git clone's default) gives to every file of its .venv (torch.optim included)."""
    return Path(filename).resolve().is_relative_to(PXPO_SOURCE)


def test_pxpo_code_is_told_by_the_package_location():
    import torch.optim.optimizer as optim

    assert is_pxpo_code(sys.modules[ComputeBatch.__module__].__file__) and is_pxpo_code(pxpo.__file__)
    assert not is_pxpo_code(optim.__file__) and not is_pxpo_code(__file__)
    # a checkout named pxpo puts "pxpo" in the path of every file of its .venv: they are still not pxpo's
    assert not is_pxpo_code("/tmp/pxpo/.venv/lib/python3.11/site-packages/torch/optim/optimizer.py")
    assert not is_pxpo_code(str(PXPO_SOURCE.parent / "pxpo_extras" / "x.py"))  # a sibling whose name starts alike


def _host_reads(model_dir, out, compute_batch, monkeypatch) -> tuple[list[str], dict]:
    from pxpo.training.rollout import sample_trajectories
    from pxpo.training.loop import train_on_trajectories
    from pxpo.training.state import build_train_state

    cfg = load_config(None, [f"model.path={model_dir}", f"output_dir={out}", *FAST, f"train.compute_batch={compute_batch}"])
    pipe, state = build_train_state(cfg)
    traj = sample_trajectories(pipe, cfg, ["a handwritten digit 1"] * 4, [0, 1, 2, 3])
    adv = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))
    reads = []

    def spy(name):
        real = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if is_pxpo_code(caller):  # pxpo's own reads (not torch.optim's step counters, not the tests')
                reads.append(f"{name} {caller}:{sys._getframe(1).f_lineno}")
            return real(self, *a, **k)

        return read

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            m.setattr(torch.Tensor, name, spy(name))
        logs = train_on_trajectories(state, traj, adv, cfg, epoch=0)
    return reads, logs


def test_host_reads_do_not_grow_with_the_chunks(tiny_model_dir, tmp_path, monkeypatch):
    """One optimizer step of 12 pairs: 12 UNet calls read the device as often as one call does."""
    one, logs = _host_reads(tiny_model_dir, tmp_path / "a", 12, monkeypatch)
    twelve, _ = _host_reads(tiny_model_dir, tmp_path / "b", 1, monkeypatch)
    assert logs["optimizer_steps"] == 1
    assert len(twelve) == len(one), (one, twelve)
    assert 1 <= len(one) <= 8, one  # a handful per step and per epoch (grad norm + finite flag, the epoch's diagnostics)


@pytest.mark.gpu
def test_auto_measures_on_cuda_and_grows():
    cb = ComputeBatch("auto", "cuda", "x")
    sizes = []

    def fn(c):
        k = c.stop - c.start
        torch.empty(k, 1 << 20, device="cuda").fill_(1.0)  # 4 MiB per item
        sizes.append(k)

    cb.run(1000, 2, fn)
    assert sizes[0] == 2 and sizes[1] > 2 and sum(sizes) == 1000
