"""The ``http`` labeller (pxpo.rewards_http) against a tiny local http.server: the wire format,
batching, retries with backoff, and one clear error per failure (500s, 4xx, hangs, wrong shapes,
no server); ``pxpo label`` against a dead server writes nothing. The real ``mlflow models serve``
is in tests/test_mlflow_reward_model.py."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from pxpo.cli import main
from pxpo.core.rewards import make_labeller
from pxpo.errors import PxpoInputError
from pxpo.rewards_http import HttpReward, RewardServerError, decode_images, encode_images, parse_predictions
from pxpo.trajectories import MAPS, Trajectories, make_meta, quantize_images, save_reward_maps, save_trajectories

H, W = 12, 10
BRIGHT = {"layout": "left_bright"}


def _images(n, seed=0):
    return quantize_images(torch.rand(n, 3, H, W, generator=torch.Generator().manual_seed(seed)))


def _prompts(n):
    return [f"a handwritten digit {i % 10}" for i in range(n)]


class FakeServer:
    """A reward server on a free port. ``mode`` picks the answer; ``requests`` holds the parsed bodies."""

    def __init__(self):
        self.mode, self.requests, self.fail_first = "ok", [], 0
        labeller = make_labeller("brightness_target", **BRIGHT)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, **body})
                mode = server.mode
                if server.fail_first > 0:
                    server.fail_first -= 1
                    mode = "503"
                if mode == "drop":  # close the connection without an answer
                    self.close_connection = True
                    return
                if mode == "hang":
                    time.sleep(1.5)
                    return self._send(200, b"{}")
                if mode.isdigit():
                    err = {"error_code": "X", "message": "boom", "stack_trace": "Traceback ...\nValueError: model exploded\n"}
                    return self._send(int(mode), json.dumps(err).encode())
                if mode == "not_json":
                    return self._send(200, b"<html>proxy error page</html>")
                rows = body["dataframe_split"]["data"]
                maps, _ = labeller(decode_images([r[0] for r in rows]), [r[1] for r in rows])
                rewards = [float(m.double().mean()) for m in maps]
                grids = [m.tolist() for m in maps]
                preds = {
                    "ok": [{"reward": r, "map": g} for r, g in zip(rewards, grids)],
                    "numbers": rewards,
                    "lists": grids,
                    "columns": {"reward": rewards, "map": grids},
                    "few": [{"reward": r, "map": g} for r, g in zip(rewards, grids)][:-1],
                    "small": [{"reward": r, "map": [row[:-1] for row in g]} for r, g in zip(rewards, grids)],
                    "ragged": [{"reward": r, "map": [g[0], g[1][:-1]]} for r, g in zip(rewards, grids)],
                    "nan": [{"reward": r, "map": [[float("nan")] * W] * H} for r in rewards],
                    "no_map": [{"reward": r} for r in rewards],
                }[mode]
                self._send(200, json.dumps({"predictions": preds}).encode())

            def _send(self, status, data):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def _server():
    s = FakeServer()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def server(_server):
    _server.mode, _server.requests, _server.fail_first = "ok", [], 0
    return _server


def _client(url, **kw):
    c = HttpReward(url, **{"retries": 3, "backoff_s": 0.01, **kw})
    c.waits = []
    c.sleep = c.waits.append  # record the backoff instead of sleeping
    return c


def _dead_url():
    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# ----- wire format -----------------------------------------------------------------


def test_images_travel_as_8_bit_png_exactly():
    images = _images(3)
    strings = encode_images(images)
    assert all(isinstance(s, str) for s in strings)
    assert torch.equal(decode_images(strings), images)  # 8-bit images: lossless
    with pytest.raises(PxpoInputError, match=r"image\[0\].*base64 PNG"):
        decode_images(["not an image"])


def test_labels_like_the_labeller_in_process_batched(server):
    images, prompts = _images(5), _prompts(5)
    ref, _ = make_labeller("brightness_target", **BRIGHT)(images, prompts)
    c = _client(server.url, batch_size=2)
    maps, info = c(images, prompts)
    assert maps.dtype == torch.float32 and torch.equal(maps, ref)  # floats survive JSON exactly
    assert info["scalar"] == pytest.approx(ref.double().mean(dim=(1, 2)).tolist(), abs=1e-12)
    assert [len(r["dataframe_split"]["data"]) for r in server.requests] == [2, 2, 1]
    assert {r["path"] for r in server.requests} == {"/invocations"}  # added to a bare address
    assert server.requests[0]["dataframe_split"]["columns"] == ["image", "prompt"]
    assert server.requests[0]["dataframe_split"]["data"][1][1] == prompts[1]
    assert server.requests[0]["params"] == {"output": "map"}
    assert [a["error"] for a in c.attempts] == [None] * 3 and c.waits == []

    server.requests.clear()
    maps, info = _client(server.url, output="scalar")(images, prompts)  # one number per image: constant maps
    assert server.requests[0]["params"] == {"output": "scalar"}
    assert torch.allclose(maps, torch.tensor(info["scalar"]).float()[:, None, None].expand(5, H, W))
    assert torch.allclose(maps.mean(dim=(1, 2)), ref.mean(dim=(1, 2)), atol=1e-6)


@pytest.mark.parametrize("mode,output", [("numbers", "scalar"), ("lists", "map"), ("columns", "map"), ("columns", "scalar")])
def test_other_answer_forms(server, mode, output):
    server.mode = mode
    images, prompts = _images(3), _prompts(3)
    ref, _ = make_labeller("brightness_target", **BRIGHT)(images, prompts)
    maps, _ = _client(server.url, output=output)(images, prompts)
    assert torch.allclose(maps, ref if output == "map" else ref.mean(dim=(1, 2), keepdim=True).expand_as(ref), atol=1e-6)


def test_through_the_registry_and_the_config(server):
    from pxpo.config import load_config
    from pxpo.labellers import make_reward

    cfg = load_config(None, ["reward.name=http", f"reward.kwargs.url={server.url}", "reward.kwargs.batch_size=2"])
    maps, info = make_reward(cfg.reward)(_images(3), _prompts(3))  # built offline; asks the server when called
    assert maps.shape == (3, H, W) and len(info["scalar"]) == 3 and len(server.requests) == 2


@pytest.mark.parametrize("kwargs,what", [
    ({}, "reward.kwargs.url"),
    ({"url": "ftp://x"}, "reward.kwargs.url"),
    ({"url": "localhost:5001"}, "reward.kwargs.url"),
    ({"url": "http://x", "output": "both"}, "reward.kwargs.output"),
    ({"url": "http://x", "batch_size": 0}, "reward.kwargs.batch_size"),
    ({"url": "http://x", "batch_size": 2.5}, "reward.kwargs.batch_size"),
    ({"url": "http://x", "timeout_s": 0}, "reward.kwargs.timeout_s"),
    ({"url": "http://x", "retries": -1}, "reward.kwargs.retries"),
    ({"url": "http://x", "backoff_s": float("nan")}, "reward.kwargs.backoff_s"),
    ({"url": "http://x", "layout": "left_bright"}, "reward.kwargs.layout"),
])
def test_bad_arguments_name_the_field(kwargs, what):
    with pytest.raises(PxpoInputError) as e:
        make_labeller("http", **kwargs)
    assert e.value.what == what


# ----- failures ----------------------------------------------------------------------


def test_transient_failures_are_retried_with_exponential_backoff(server):
    server.fail_first = 2  # two 503s, then the answer
    c = _client(server.url, backoff_s=0.5)
    maps, _ = c(_images(2), _prompts(2))
    assert maps.shape == (2, H, W)
    assert [a["attempt"] for a in c.attempts] == [0, 1, 2] and "HTTP 503" in c.attempts[0]["error"]
    assert c.waits == [0.5, 1.0]


def test_500s_exhaust_the_retries_and_name_the_url(server):
    server.mode = "500"
    c = _client(server.url, retries=3, backoff_s=0.01, max_backoff_s=0.03)
    with pytest.raises(RewardServerError) as e:
        c(_images(3), _prompts(3))
    msg = str(e.value)
    assert msg.startswith(f"reward server {server.url}/invocations: batch 0 (samples 0-2): HTTP 500: ")
    assert "b'{\"error_code\": \"X\", \"message\": \"boom\"" in msg  # the first bytes of the body
    assert "the server's error: ValueError: model exploded" in msg and "4 attempts" in msg
    assert c.waits == [0.01, 0.02, 0.03] and len(server.requests) == 4  # capped at max_backoff_s
    assert e.value.exit_code == 3 and isinstance(e.value, PxpoInputError)


def test_a_rejected_request_is_not_retried(server):
    server.mode = "400"
    c = _client(server.url)
    with pytest.raises(RewardServerError, match=r"HTTP 400: b'.*model exploded") as e:
        c(_images(2), _prompts(2))
    assert len(server.requests) == 1 and c.waits == [] and "pxpo.rewards_http" in str(e.value)


@pytest.mark.parametrize("mode,output,expected", [
    ("few", "map", "batch 0 (samples 0-2): expected 3 predictions (one per image), got 2"),
    ("small", "map", f"row 0: expected a {H} x {W} map, got shape ({H}, {W - 1})"),
    ("ragged", "map", "row 0: the map is not a rectangular nested list"),
    ("nan", "map", f"row 0: the map holds {H * W} NaN or inf values"),
    ("no_map", "map", "row 0 has no map (output: map)"),
    ("lists", "scalar", "row 0: expected a number (output: scalar)"),
    ("not_json", "map", "the answer is not JSON: b'<html>proxy error page</html>'"),
])
def test_wrong_answers_fail_at_once_with_what_came_back(server, mode, output, expected):
    server.mode = mode
    c = _client(server.url, output=output)
    with pytest.raises(RewardServerError) as e:
        c(_images(3), _prompts(3))
    assert str(e.value).startswith(f"reward server {server.url}/invocations: ") and expected in str(e.value)
    assert len(server.requests) == 1


def test_parse_predictions_needs_the_predictions_key():
    with pytest.raises(ValueError, match=r"no 'predictions' in the answer \(keys: \['error'\]\)"):
        parse_predictions({"error": "x"}, 1, (2, 2), "map")
    with pytest.raises(ValueError, match="predictions is a str"):
        parse_predictions({"predictions": "x"}, 1, (2, 2), "map")


def test_a_hanging_server_times_out(server):
    server.mode = "hang"
    c = _client(server.url, timeout_s=0.2, retries=1)
    t0 = time.monotonic()
    with pytest.raises(RewardServerError, match=r"no answer within 0.2 s \(timeout_s\) \(2 attempts in"):
        c(_images(1), _prompts(1))
    assert time.monotonic() - t0 < 1.4 and len(server.requests) == 2


def test_a_dropped_connection_is_retried(server):
    server.mode = "drop"
    c = _client(server.url, retries=1)
    with pytest.raises(RewardServerError, match=r"batch 0 \(samples 0-0\): connection lost \(RemoteDisconnected: .*\(2 attempts in"):
        c(_images(1), _prompts(1))
    assert len(server.requests) == 2 and c.waits == [0.01]


def test_no_server_is_retried_then_named():
    url = _dead_url()
    c = _client(url, retries=2)
    with pytest.raises(RewardServerError) as e:
        c(_images(1), _prompts(1))
    assert f"reward server {url}/invocations: batch 0 (samples 0-0): cannot connect" in str(e.value)
    assert "3 attempts" in str(e.value) and "mlflow models serve" in str(e.value) and c.waits == [0.01, 0.02]


# ----- the label stage ---------------------------------------------------------------


def labelled_dir(tmp_path, n=4):
    """A trajectory directory whose images are labelled with brightness_target already."""
    g = torch.Generator().manual_seed(1)
    images, prompts = _images(n, seed=3), _prompts(n)
    tr = Trajectories(
        latents=torch.randn(n, 3, 4, 3, 3, generator=g), log_probs=torch.randn(n, 2, 4, 3, 3, generator=g),
        timesteps=torch.tensor([500, 250]), prompt_embeds=torch.randn(n, 4, 8, generator=g), negative_prompt_embeds=torch.zeros(1, 4, 8),
        prompts=prompts, seeds=list(range(n)), images=images,
        meta=make_meta(model_path="m", revision=None, scheduler_config={}, num_steps=2, eta=1.0, guidance_scale=3.0, negative_prompt=""),
    )
    d = tmp_path / "traj"
    save_trajectories(tr, d)
    save_reward_maps(d, make_labeller("brightness_target", **BRIGHT)(images, prompts)[0], {"labeller": "brightness_target"})
    return d


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def check_label_against_dead_server(d, url, capsys, tmp_path):
    """``pxpo label`` (beside the trajectories, and into --out) fails with one line and writes nothing."""
    before = snapshot(tmp_path)
    over = ["reward.name=http", f"reward.kwargs={{url: '{url}', batch_size: 2, retries: 1, backoff_s: 0.01}}"]
    capsys.readouterr()
    assert main(["label", "--quiet", "--trajectories", str(d), *over]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: reward server {url}/invocations: batch 0 (samples 0-1): cannot connect"), err
    assert main(["label", "--quiet", "--trajectories", str(d), "--out", str(tmp_path / "out"), *over]) == 3
    assert snapshot(tmp_path) == before  # the earlier maps intact, no new or temporary file anywhere
    assert (d / MAPS).is_file()


def test_label_stage_against_a_dead_server_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    d = labelled_dir(tmp_path)
    check_label_against_dead_server(d, _dead_url(), capsys, tmp_path)
