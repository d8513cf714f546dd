"""Shared fixtures: randomly initialised tiny pipelines (no pretraining in tests), an empty MLflow store.

What several test files build is built once per session (``scripts/test.sh`` runs pytest with pytest-xdist:
once for all its workers, see ``_build_once``). Under xdist, whole test files go to a worker
(``--dist loadfile``) and the slowest files start first (``SLOW_FIRST``), so that neither worker is left
with a long file at the end.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

# Test files that take longest (CPU seconds measured on a shared 2-core machine, issue 23), slowest first. Under xdist they are
# scheduled before every other file, whole; a file not named here keeps its collection order after them.
SLOW_FIRST = (
    "tests/test_dvc.py",  # ~170 s: dvc repro runs 11 stage processes
    "tests/training/test_distributed.py",  # ~170 s: 2-process launches
    "tests/test_pipeline_local.py",  # ~170 s: two kfp.local pipelines (the default, region-level preferences), each task a process
    "tests/test_label_studio.py",  # ~70 s and a server start (mostly waiting)
    "tests/training/test_kl.py",
    "tests/test_mlflow.py",
    "tests/embedded/test_base_build.py",
    "tests/training/test_loop.py",
    "tests/test_gold_gate.py",
    "tests/test_pipeline_spec.py",
    "tests/training/test_flow_train.py",
    "tests/test_bench_gpu_epoch.py",
)


def _build_once(tmp_path_factory, name: str, build) -> Path:
    """``build(d)`` once for the session; under pytest-xdist once for all workers: the first worker to take
    the lock builds into the run's shared temporary directory, the others wait for it and use the result.
    The result is read-only by convention, as any session fixture's is."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        d = tmp_path_factory.mktemp("models") / name
        build(d)
        return d
    root = tmp_path_factory.getbasetemp().parent / "shared"  # the workers' basetemps are popen-gwN under it
    root.mkdir(exist_ok=True)
    d, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not done.exists():
                shutil.rmtree(d, ignore_errors=True)  # a worker that died mid-build
                build(d)
                done.touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return d


@pytest.fixture(scope="session")
def tiny_pipe():
    from pxpo.embedded.architecture import make_tiny_pipeline

    pipe = make_tiny_pipeline(seed=0)
    # Random init gives near-zero UNet outputs; a seeded perturbation makes
    # predictions non-trivial so log-prob tests exercise real values.
    return pipe


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny pipeline (make_tiny_pipeline(seed=0), as tiny_pipe) saved with save_pretrained (loaded back via from_pretrained)."""
    from pxpo.embedded.architecture import make_tiny_pipeline

    return _build_once(tmp_path_factory, "tiny", lambda d: make_tiny_pipeline(seed=0).save_pretrained(d))


@pytest.fixture(scope="session")
def tiny_lcm_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny pipeline with a w-embedding UNet and an LCMScheduler (a random 'consistency model')."""

    def build(d):
        from diffusers import LCMScheduler, UNet2DConditionModel

        shutil.copytree(tiny_model_dir, d)
        base = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
        unet = UNet2DConditionModel.from_config(base.config, time_cond_proj_dim=16)
        unet.load_state_dict(base.state_dict(), strict=False)
        unet.save_pretrained(d / "unet")
        LCMScheduler.from_pretrained(tiny_model_dir / "scheduler").save_pretrained(d / "scheduler")

    return _build_once(tmp_path_factory, "tiny-lcm", build)


@pytest.fixture(scope="session")
def tiny_vae_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny pipeline with its VAE trained 60 steps on digits (~6 s): decoded images then depend on the
    latents, so an image reward can be learnt (the random VAE decodes nearly the same grey for any latent)."""

    def build(d):
        import torch.nn.functional as F

        from pxpo.embedded.digits import digits_dataset
        from pxpo.models import load_pipeline

        pipe = load_pipeline(str(tiny_model_dir))
        images, _ = digits_dataset(16)
        g = torch.Generator().manual_seed(0)
        vae = pipe.vae.train().requires_grad_(True)
        opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
        for _ in range(60):
            x = images[torch.randint(0, images.shape[0], (32,), generator=g)]
            post = vae.encode(x).latent_dist
            loss = F.mse_loss(vae.decode(post.sample(generator=g)).sample, x) + 1e-3 * post.kl().mean() / x[0].numel()
            opt.zero_grad()
            loss.backward()
            opt.step()
        vae.eval().requires_grad_(False)
        with torch.no_grad():
            vae.register_to_config(scaling_factor=float(1 / vae.encode(images[:512]).latent_dist.mean.std()))
        pipe.save_pretrained(d)

    return _build_once(tmp_path_factory, "tiny-vae", build)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A random tiny SD3 pipeline (flow matching, joint-attention transformer) saved with save_pretrained."""

    def build(d):
        from pxpo.embedded.sd3 import make_tiny_sd3_pipeline

        pipe = make_tiny_sd3_pipeline(seed=0)
        with torch.no_grad():  # a non-trivial velocity (random init has a near-zero output layer)
            torch.manual_seed(0)
            for p in pipe.transformer.proj_out.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        pipe.save_pretrained(d)

    return _build_once(tmp_path_factory, "tiny-sd3", build)


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory) -> Path:
    """An empty, fully migrated MLflow SQLite store. Creating one runs MLflow's alembic migrations (seconds);
    a test's store starts from a copy of it instead (as ``store/mlruns.db``). A fresh store is still created from
    scratch by the tests that run the stages end to end (tests/test_gold_gate.py, kfp.local, dvc repro)."""
    import prereq

    mlflow = prereq.import_module("mlflow", "pinned in requirements-lock.txt (bash scripts/setup.sh)")

    def build(d):
        d.mkdir(parents=True)
        client = mlflow.MlflowClient(f"sqlite:///{d / 'mlruns.db'}")
        client.search_experiments()
        client.search_registered_models()

    return _build_once(tmp_path_factory, "mlflow-template", build) / "mlruns.db"


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker orders the same way (xdist checks the collections agree)
        rank = {f: i for i, f in enumerate(SLOW_FIRST)}
        items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable: files stay whole
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
