"""Data-parallel runs equal one process (CPU, gloo, 2 processes) and the launch contract.

* 2 processes vs 1, the same config, 2 epochs, DDIM and LCM x PXPO and DDPO
  x LoRA and full fine-tuning, and the flow SDE (tiny SD3, LoRA, GRPO groups)
  x PXPO (SDE window), DDPO, NFT (with its KL) and scalar NFT: parameters
  equal within 1e-5; every rank computes the same advantages from one gather
  of the maps.
* ``pxpo run --processes 2`` (the README's command): one metrics line per
  epoch; kill -9 of one worker mid-run, the same command again: the
  uninterrupted run's parameters.
* a world size without a process group, or batches that do not split: exit 2.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pxpo.training.loop
from pxpo.cli import main

# adam_epsilon=1: Adam's update m / (sqrt(v) + eps) is then linear in the gradient (~ SGD with momentum,
# lr 0.1). With the default eps=1e-8 the first update is lr * g / |g| = +-lr for EVERY element, so an
# element whose exact gradient is 0 but comes out as +-1e-12 from another float summation order (one
# process sums 4 samples, two sum 2 and all-reduce) moves by +-lr: no two reduction orders agree to
# 1e-5 then. No clipping either (max_grad_norm 1e3): a wrong loss scale must show in the update.
FAST = ["sample.batch_size=4", "sample.num_steps=3", "train.batch_size=2", "train.learning_rate=0.1", "train.clip_range=0.1",
        "train.min_count=2", "train.buffer_size=4", "train.epochs=2", "train.adam_epsilon=1", "train.max_grad_norm=1000"]
TOL = 1e-5
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


# The matrix runs without the drift probe: with its default period (5) a 2-epoch run never probes, it would only
# sample the probe's base batch in every process of every run. The `pxpo run --processes 2` runs below keep it on.
MATRIX = [*FAST, "train.probe_every=0"]


def _matrix(models: dict, root: Path) -> list[tuple[str, list[str]]]:
    runs = []
    for sampler in ("ddim", "lcm"):
        for algorithm in ("pxpo", "ddpo"):
            for lora in (True, False):
                name = f"{sampler}-{algorithm}-{'lora' if lora else 'full'}"
                extra = [f"model.path={models[sampler]}", f"sample.sampler={sampler}", f"train.algorithm={algorithm}", f"train.use_lora={str(lora).lower()}"]
                if sampler == "lcm":
                    extra.append("sample.num_steps=2")
                if lora:  # 8 samples in 2 UNet batches, 2 micro-batches of 4 per optimizer step
                    extra += ["sample.num_batches=2", "train.batch_size=4", "train.gradient_accumulation_steps=2"]
                else:  # 1 M weights move together: a smaller step keeps epoch 1's 8-bit images away from rounding flips
                    extra.append("train.learning_rate=0.005")
                runs.append((name, [*MATRIX, *extra]))
    # Flow models (tiny SD3, LoRA): Flow-GRPO pixel-wise (with an SDE window) and scalar, DiffusionNFT pixel-wise
    # (with its velocity KL) and scalar, all with GRPO group advantages (groups of 2 of the epoch's 8 samples)
    flow = [f"model.path={models['flow_sde']}", "sample.sampler=flow_sde", "sample.group_size=2", "train.advantage_mode=group",
            "sample.num_batches=2", "train.batch_size=4", "train.gradient_accumulation_steps=2",
            "train.learning_rate=1.0"]  # the tiny SD3's gradients are small: lr 0.1 moves lora_B by < 1e-3 in 2 epochs
    for algorithm, extra in (("pxpo", ["sample.sde_window_start=1", "sample.sde_window_size=2"]), ("ddpo", []),
                             ("nft", ["train.kl_coef=0.5"]), ("nft_scalar", [])):
        runs.append((f"flow_sde-{algorithm}-lora", [*MATRIX, *flow, f"train.algorithm={algorithm}", *extra]))
    return runs


def _params(run_dir: Path, lora: bool) -> dict:
    if lora:
        return load_file(str(run_dir / "lora" / "pytorch_lora_weights.safetensors"))
    return load_file(str(run_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _launch(nproc: int, script_args: list[str], timeout=600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *script_args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def models(tiny_model_dir, tiny_lcm_model_dir, tiny_sd3_dir):
    return {"ddim": tiny_model_dir, "lcm": tiny_lcm_model_dir, "flow_sde": tiny_sd3_dir}


def test_two_processes_equal_one_process(tmp_path, models, monkeypatch):
    runs = _matrix(models, tmp_path)
    record = tmp_path / "record"
    record.mkdir()
    spec = {"runs": [[*o, f"output_dir={tmp_path / 'two' / name}"] for name, o in runs], "record": str(record)}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    t0 = time.perf_counter()
    r = _launch(2, [str(Path(__file__).with_name("distributed_worker.py")), str(tmp_path / "spec.json")])
    assert r.returncode == 0, r.stderr[-3000:]
    t_two = time.perf_counter() - t0

    # the same configs in this one process, recording the advantages the same way
    import distributed_worker

    monkeypatch.setattr(pxpo.training.loop, "global_advantages", distributed_worker.recording)
    diffs = {}
    for i, (name, o) in enumerate(runs):
        distributed_worker.RECORDS.clear()
        assert main(["run", "--quiet", "--params", "/dev/null", "--", *o, f"output_dir={tmp_path / 'one' / name}"]) == 0
        one_rec = list(distributed_worker.RECORDS)
        ranks = [torch.load(record / f"run{i}_rank{r}.pt") for r in (0, 1)]
        for epoch, (mine, r0, r1) in enumerate(zip(one_rec, *ranks)):
            assert r0["gathers"] == r1["gathers"] == 1, "the maps are gathered once per epoch"
            assert r0["prompts"] == r1["prompts"] == mine["prompts"], (name, epoch)  # sample i: the same prompt
            assert torch.equal(r0["adv"], r1["adv"]), (name, epoch)  # identical on every rank
            assert torch.allclose(r0["maps"], mine["maps"], atol=1e-2), (name, epoch)  # the same samples
            assert torch.allclose(r0["adv"], mine["adv"], atol=5e-2), (name, epoch)
        lora = "lora" in name
        diffs[name] = _max_diff(_params(tmp_path / "one" / name, lora), _params(tmp_path / "two" / name, lora))
        base = _params(tmp_path / "one" / name, lora)
        if lora:  # the runs moved the weights far more than TOL: equality is not trivial (lora_B starts at 0)
            assert max(v.abs().max().item() for k, v in base.items() if "lora_B" in k or "lora.up" in k) > 100 * TOL
        else:
            from diffusers import UNet2DConditionModel

            model = next(x.split("=", 1)[1] for x in o if x.startswith("model.path="))
            ref = UNet2DConditionModel.from_pretrained(Path(model) / "unet").state_dict()
            assert max((base[k] - ref[k]).abs().max().item() for k in base) > 100 * TOL
        # 2 processes wrote one metrics line per epoch, the same reward
        m1 = [json.loads(x) for x in (tmp_path / "one" / name / "metrics.jsonl").read_text().splitlines()]
        m2 = [json.loads(x) for x in (tmp_path / "two" / name / "metrics.jsonl").read_text().splitlines()]
        assert [h["epoch"] for h in m2] == [0, 1]
        assert [h["samples_seen"] for h in m2] == [h["samples_seen"] for h in m1]
        assert [h["optimizer_steps"] for h in m2] == [h["optimizer_steps"] for h in m1]
        assert all(abs(a["reward_mean"] - b["reward_mean"]) < 1e-3 for a, b in zip(m1, m2))
        print(name, diffs[name])
    print(f"2-process launch {t_two:.1f}s; max |param diff| 1 vs 2 processes: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    print(diffs); assert all(v <= TOL for v in diffs.values()), diffs


CLI_RUN = [*FAST, "train.epochs=3", "train.save_every=1"]


def _pxpo_run(model, out, *flags):
    cmd = [sys.executable, "-m", "pxpo.cli", "run", "--quiet", "--params", "/dev/null", *flags, "--", *CLI_RUN, f"model.path={model}", f"output_dir={out}"]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = dict(x.split("=", 1) for x in (Path("/proc") / str(pid) / "environ").read_text().split("\0") if "=" in x)
    except OSError:
        return None
    return int(env["RANK"]) if "RANK" in env else None


@pytest.fixture(scope="module")
def cli_two(tmp_path_factory, tiny_model_dir):
    """The README's command, uninterrupted: `pxpo run --processes 2`, 3 epochs."""
    out = tmp_path_factory.mktemp("cli") / "two"
    proc = _pxpo_run(tiny_model_dir, out, "--processes", "2")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


def test_pxpo_run_processes_two_writes_once(cli_two):
    lines = [json.loads(x) for x in (cli_two / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in lines] == [0, 1, 2]  # the main process alone writes: one line per epoch
    assert [h["samples_seen"] for h in lines] == [4, 8, 12]
    assert (cli_two / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (cli_two / "checkpoints").iterdir()) == ["epoch_0001", "epoch_0002"]


def test_kill_one_process_and_resume(tmp_path, tiny_model_dir, cli_two):
    out = tmp_path / "killed"
    proc = _pxpo_run(tiny_model_dir, out, "--processes", "2")
    deadline = time.time() + 300
    while not (out / "checkpoints" / "epoch_0000").exists():  # epoch 0 done: kill during epoch 1
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    victim = next(pid for pid in _children(proc.pid) if _rank_of(pid) == 1)
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and not (out / "lora").exists(), "the run should have died with its worker"

    proc = _pxpo_run(tiny_model_dir, out, "--processes", "2")  # the same command again
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in err or "resumed from" in _  # printed by the main process
    a, b = _params(cli_two, True), _params(out, True)
    assert _max_diff(a, b) == 0.0  # the same processes, the same order: bit-identical
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_world_size_without_process_group_exits_2(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    out = tmp_path / "r"
    assert main(["run", "--quiet", "--params", "/dev/null", "--", *FAST, f"model.path={tiny_model_dir}", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "WORLD_SIZE=2" in err and "--processes" in err
    assert not out.exists()  # nothing written


def test_batches_must_split_over_processes(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "r"
    assert main(["run", "--quiet", "--params", "/dev/null", "--processes", "3", "--", *FAST, f"model.path={tiny_model_dir}", f"output_dir={out}"]) == 2
    assert "sample.batch_size" in capsys.readouterr().err and not out.exists()
