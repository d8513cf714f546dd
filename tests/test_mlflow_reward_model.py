"""A reward model logged to MLflow as a pyfunc (pxpo.mlflow.reward_model) and served with the REAL
``mlflow models serve``: the http labeller gives what the labeller gives in process; the server
killed mid-run: retries with backoff, then one message naming the URL; ``pxpo label`` against the
dead server leaves the earlier maps intact."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from servers import free_port, stop
import torch

import prereq  # noqa: E402

mlflow = prereq.import_module("mlflow", "pinned in requirements-lock.txt (bash scripts/setup.sh)")

from pxpo.cli import main as pxpo_main  # noqa: E402
from pxpo.core.rewards import make_labeller  # noqa: E402
from pxpo.errors import PxpoInputError  # noqa: E402
from pxpo.mlflow.reward_model import RewardModel, log_reward_model, main, score  # noqa: E402
from pxpo.rewards_http import HttpReward, RewardServerError, encode_images  # noqa: E402
from pxpo.trajectories import MAPS, load_reward_maps, load_trajectories  # noqa: E402
from test_rewards_http import BRIGHT, H, W, _images, _prompts, check_label_against_dead_server, labelled_dir  # noqa: E402

SERVE_WAIT_S = 180


def _frame(images, prompts):
    return pd.DataFrame({"image": encode_images(images), "prompt": prompts})


# ----- the pyfunc in process ------------------------------------------------------------


def test_predict_gives_the_labeller_maps_and_rewards():
    images, prompts = _images(3), _prompts(3)
    ref, _ = make_labeller("brightness_target", **BRIGHT)(images, prompts)
    model = RewardModel(make_labeller("brightness_target", **BRIGHT))
    out = model.predict(None, _frame(images, prompts), params={"output": "map"})
    assert list(out.columns) == ["reward", "map"]
    assert torch.equal(torch.tensor(out["map"].tolist()).float(), ref)
    assert out["reward"].tolist() == pytest.approx(ref.double().mean(dim=(1, 2)).tolist(), abs=1e-12)
    assert list(model.predict(None, _frame(images, prompts), params={"output": "scalar"}).columns) == ["reward"]
    with pytest.raises(PxpoInputError, match="no `image` column"):
        model.predict(None, pd.DataFrame({"prompt": ["x"]}))
    with pytest.raises(PxpoInputError, match="unknown output 'both'"):
        model.predict(None, _frame(images, prompts), params={"output": "both"})


def test_score_takes_maps_pairs_and_scalars():
    images = _images(2)
    maps, rewards = score(lambda x, p: torch.tensor([0.25, 0.75]), images, ["a", "b"])  # scalars: constant maps
    assert maps.shape == (2, H, W) and torch.equal(maps[1], torch.full((H, W), 0.75)) and rewards == [0.25, 0.75]
    module = torch.nn.Module()
    module.forward = lambda x, p: x.mean(1)  # a torch module returning maps
    maps, rewards = score(module, images, ["a", "b"])
    assert torch.allclose(maps, images.mean(1)) and rewards == pytest.approx(images.mean(1).double().mean(dim=(1, 2)).tolist())
    from pxpo.core.rewards.learned import DenseRewardNet

    net = DenseRewardNet(channels=4, layers=1).eval()  # the learned dense reward model
    maps, _ = score(net, images, ["a", "b"])
    with torch.no_grad():
        assert torch.equal(maps, net(images, ["a", "b"]))
    with pytest.raises(PxpoInputError, match=r"returned shape \(2, 3\)"):
        score(lambda x, p: torch.zeros(2, 3), images, ["a", "b"])


def test_logging_checks_the_labeller_first(tmp_path):
    with pytest.raises(PxpoInputError, match="unknown labeller 'nope'"):
        log_reward_model("nope")
    with pytest.raises(PxpoInputError, match="reward.kwargs.layout"):
        log_reward_model("brightness_target", {"layout": "diagonal"})
    with pytest.raises(PxpoInputError, match="labeller is a int"):
        log_reward_model(3)
    assert main(["brightness_target", "--kwargs", "{nope", "--save", str(tmp_path / "m")]) == 2
    assert not (tmp_path / "m").exists()


# ----- served by the real `mlflow models serve` ---------------------------------------


_free_port, _stop = free_port, stop  # tests/servers.py


def _serve(model_uri: str, tracking_uri: str, d: Path):
    """``mlflow models serve -m <uri> -p <free port> --env-manager local``; (process, base URL, log file)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # uvicorn of this environment
    env["OMP_NUM_THREADS"] = "1"
    log = d / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri, "-p", str(port),
             "--host", "127.0.0.1", "--env-manager", "local"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=d, env=env,
        )
    return proc, f"http://127.0.0.1:{port}", log


def _wait_ping(url: str, proc, log: Path) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < SERVE_WAIT_S and proc.poll() is None:
        try:
            if urllib.request.urlopen(url + "/ping", timeout=2).status == 200:
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.5)
    why = f"exited with {proc.poll()}" if proc.poll() is not None else f"did not answer /ping within {SERVE_WAIT_S} s"
    pytest.fail(f"mlflow models serve {why}:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_served_reward_model_labels_like_in_process_and_fails_clearly_when_killed(tmp_path, monkeypatch, capsys):
    timings = {}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    tracking = f"sqlite:///{tmp_path / 'mlruns.db'}"
    mlflow.set_tracking_uri(tracking)
    try:
        t0 = time.monotonic()
        with mlflow.start_run():
            uri = log_reward_model("brightness_target", BRIGHT)
            # a function (here a labeller closure), pickled: loads back in process
            fn_uri = log_reward_model(make_labeller("brightness_target", layout="top_bright"), name="fn_model")
        timings["log"] = time.monotonic() - t0
        assert uri.startswith("models:/m-")
        images, prompts = _images(6, seed=5), _prompts(6)
        top, _ = make_labeller("brightness_target", layout="top_bright")(images, prompts)
        out = mlflow.pyfunc.load_model(fn_uri).predict(_frame(images, prompts))
        assert torch.equal(torch.tensor(out["map"].tolist()).float(), top)
    finally:
        mlflow.set_tracking_uri(None)

    proc, url, log = _serve(uri, tracking, tmp_path)
    try:
        timings["serve"] = _wait_ping(url, proc, log)
        ref, _ = make_labeller("brightness_target", **BRIGHT)(images, prompts)
        t0 = time.monotonic()
        maps, info = HttpReward(url, batch_size=4)(images, prompts)
        timings["label"] = time.monotonic() - t0
        assert maps.dtype == torch.float32 and torch.allclose(maps, ref, atol=1e-6, rtol=0)
        assert info["scalar"] == pytest.approx(ref.double().mean(dim=(1, 2)).tolist(), abs=1e-6)
        scalars, _ = HttpReward(url, output="scalar")(images, prompts)
        assert torch.allclose(scalars, ref.mean(dim=(1, 2), keepdim=True).expand_as(ref), atol=1e-6)

        # pxpo label through the server: the maps it writes are the in-process labeller's
        d = labelled_dir(tmp_path)
        (d / MAPS).unlink()
        over = ["reward.name=http", f"reward.kwargs={{url: '{url}', batch_size: 3}}"]
        assert pxpo_main(["label", "--quiet", "--trajectories", str(d), *over]) == 0
        traj = load_trajectories(d)
        written, _ = load_reward_maps(d, len(traj), (H, W))
        assert torch.allclose(written, make_labeller("brightness_target", **BRIGHT)(traj.images, traj.prompts)[0], atol=1e-6)

        # killed mid-run: the first batch is answered, the second retried with backoff, then one clear error
        client = HttpReward(url, batch_size=2, retries=3, backoff_s=0.05)
        waits = []
        client.sleep = lambda s: (waits.append(s), time.sleep(s))
        post = client.post

        def post_then_kill(body):
            raw = post(body)
            _stop(proc)
            return raw

        client.post = post_then_kill
        t0 = time.monotonic()
        with pytest.raises(RewardServerError) as e:
            client(images, prompts)
        timings["fail"] = time.monotonic() - t0
    finally:
        _stop(proc)
    msg = str(e.value)
    assert msg.startswith(f"reward server {url}/invocations: batch 1 (samples 2-3): "), msg
    assert "4 attempts" in msg and "mlflow models serve" in msg
    assert [(a["batch"], a["attempt"], a["error"] is None) for a in client.attempts] == [
        (0, 0, True), (1, 0, False), (1, 1, False), (1, 2, False), (1, 3, False)]
    assert waits == [0.05, 0.1, 0.2]

    # pxpo label against the dead server: exit 3, one line, the maps written above intact
    check_label_against_dead_server(d, url, capsys, tmp_path)
    print(f"\nlog 2 models {timings['log']:.1f} s; mlflow models serve answered /ping after {timings['serve']:.1f} s; "
          f"6 images labelled in {timings['label']:.2f} s; killed server reported after {timings['fail']:.2f} s:\n{msg}")
