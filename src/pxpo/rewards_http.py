"""Reward models served over HTTP: the ``http`` labeller, a client of MLflow's scoring protocol.

A team serves its reward model the way it serves the policy: logged to MLflow
as a pyfunc (:func:`pxpo.mlflow.reward_model.log_reward_model`) and served with
``mlflow models serve -m <uri> -p 5001 --env-manager local``. A config then
names it like any labeller::

    reward:
      name: http
      kwargs: {url: "http://127.0.0.1:5001", output: map, batch_size: 16,
               timeout_s: 60, retries: 3, backoff_s: 1.0}

Wire format (MLflow's scoring protocol; any server that speaks it will do)
------------------------------------------------------------------------------
Request: ``POST <url>`` with ``Content-Type: application/json`` (a ``url``
without a path gets ``/invocations`` appended, MLflow's endpoint)::

    {"dataframe_split": {"columns": ["image", "prompt"],
                         "data": [["<base64 PNG>", "a prompt"], ...]},
     "params": {"output": "map"}}

* ``image``: the image as an 8-bit RGB PNG, base64 (standard alphabet). pxpo's
  trajectories hold 8-bit images, so nothing is lost; other images are rounded
  to the nearest 1/255 on the way.
* ``prompt``: the image's prompt.
* ``params.output``: ``"map"`` or ``"scalar"``, what the client will read.

Response: ``{"predictions": [row, ...]}``, one row per image, in order. A row
is ``{"reward": r, "map": [[...] * W] * H}`` (``map``, the ``H x W`` pixel
rewards, is needed with ``output: map``; ``reward`` with ``output: scalar``),
or just a number (a scalar) or just an ``H x W`` nested list (a map). A pyfunc
returning a DataFrame with columns ``reward`` and ``map`` answers in the first
form (MLflow writes DataFrames as records). A scalar becomes a constant map
(every pixel gets the image's reward), as with the built-in scalar labellers.

Failures
--------
Each batch of ``batch_size`` images is one request, sent at most ``1 + retries``
times: a refused or dropped connection, no answer within ``timeout_s`` (per
socket operation) and HTTP 429 / 5xx are retried after ``backoff_s * 2**k``
seconds (``k = 0, 1, ...``, at most ``max_backoff_s``). Any other status (the
request itself is wrong) and a malformed answer fail at once. Either way a
:class:`RewardServerError` names the URL, the batch and what came back (the
status and the first bytes of the body, or the wrong shape); ``pxpo`` prints
it as one line and exits with status 3, and ``pxpo label`` writes nothing.
"""

from __future__ import annotations

import base64
import collections
import http.client
import io
import json
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

import torch

from .core.rewards import LabelFn, constant_maps, register
from .errors import PxpoInputError

COLUMNS = ("image", "prompt")
OUTPUTS = ("map", "scalar")
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
BODY_BYTES = 200  # how much of an unexpected body an error message quotes


class RewardServerError(PxpoInputError):
    """The reward server failed or answered wrongly; the message names the URL and what came back.

    A :class:`pxpo.errors.PxpoInputError`, so the CLI prints it as one line; exit status 3
    (a service pxpo depends on failed; 2 is bad input).
    """

    exit_code = 3

    def __init__(self, url: str, problem: str, fix: str):
        self.url = url
        super().__init__(f"reward server {url}", problem, fix)


# --------------------------------------------------------------------------
# wire format (shared with the server side, pxpo.mlflow.reward_model)


def encode_images(images: torch.Tensor) -> list[str]:
    """Images ``(B, 3, H, W)`` in ``[0, 1]`` -> ``B`` base64 strings of 8-bit RGB PNGs."""
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a, "RGB").save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def decode_images(strings: Sequence[str], what: str = "image") -> torch.Tensor:
    """``B`` base64 PNGs (one size) -> images ``(B, 3, H, W)`` float32 in ``[0, 1]``."""
    import numpy as np
    from PIL import Image

    arrays = []
    for i, s in enumerate(strings):
        try:
            img = Image.open(io.BytesIO(base64.b64decode(str(s), validate=True))).convert("RGB")
        except Exception as exc:  # binascii.Error, PIL.UnidentifiedImageError, ...
            raise PxpoInputError(f"{what}[{i}]", f"not a base64 PNG ({type(exc).__name__}: {exc})",
                                 "send each image as a base64-encoded 8-bit RGB PNG") from None
        arrays.append(np.asarray(img))
    sizes = sorted({a.shape[:2] for a in arrays})
    if len(sizes) > 1:
        raise PxpoInputError(what, f"images of different sizes {sizes} in one request", "send images of one size per request")
    if not arrays:
        return torch.zeros(0, 3, 1, 1)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def request_body(images: torch.Tensor, prompts: Sequence[str], output: str) -> bytes:
    """The JSON body of one request (see the module doc)."""
    rows = [[img, str(p)] for img, p in zip(encode_images(images), prompts)]
    payload = {"dataframe_split": {"columns": list(COLUMNS), "data": rows}, "params": {"output": output}}
    return json.dumps(payload).encode()


def parse_predictions(payload: Any, n: int, hw: tuple[int, int], output: str) -> tuple[torch.Tensor | None, list[float]]:
    """A response (parsed JSON) -> (maps ``(n, H, W)`` float32 or None with ``output="scalar"``, rewards).

    ``rewards`` are the rows' ``reward`` values, else the maps' pixel means.

    Raises:
        ValueError: the answer does not have the expected form; the message says how.
    """
    preds = payload.get("predictions") if isinstance(payload, dict) else payload
    if isinstance(payload, dict) and preds is None:
        raise ValueError(f"no 'predictions' in the answer (keys: {sorted(payload)[:8]})")
    if isinstance(preds, dict):  # column-wise: {"reward": [...], "map": [...]}
        cols = {k: v for k, v in preds.items() if isinstance(v, list)}
        lengths = {len(v) for v in cols.values()}
        if not cols or len(lengths) != 1:
            raise ValueError(f"predictions is a dict without equal-length columns (keys: {sorted(preds)[:8]})")
        preds = [dict(zip(cols, vals)) for vals in zip(*cols.values())]
    if not isinstance(preds, list):
        raise ValueError(f"predictions is a {type(preds).__name__}, not a list")
    if len(preds) != n:
        raise ValueError(f"expected {n} predictions (one per image), got {len(preds)}")
    h, w = hw
    maps, rewards = [], []
    for i, row in enumerate(preds):
        if isinstance(row, dict):
            reward, grid = row.get("reward"), row.get("map")
        elif isinstance(row, list):
            reward, grid = None, row
        else:
            reward, grid = row, None
        if output == "map":
            if grid is None:
                raise ValueError(f"row {i} has no map (output: map); got {_short(row)}: have the server return "
                                 "'map' or set reward.kwargs.output: scalar")
            try:
                m = torch.tensor(grid, dtype=torch.float64)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"row {i}: the map is not a rectangular nested list of numbers ({exc})") from None
            if tuple(m.shape) != (h, w):
                raise ValueError(f"row {i}: expected a {h} x {w} map, got shape {tuple(m.shape)}")
            if not bool(torch.isfinite(m).all()):
                raise ValueError(f"row {i}: the map holds {int((~torch.isfinite(m)).sum())} NaN or inf values")
            maps.append(m.float())
            if reward is None:
                reward = float(m.mean())
        if isinstance(reward, bool) or not isinstance(reward, (int, float)):
            raise ValueError(f"row {i}: expected a number (output: scalar), got {_short(row)}")
        if not math.isfinite(reward):
            raise ValueError(f"row {i}: the reward is {reward}")
        rewards.append(float(reward))
    return (torch.stack(maps) if maps else torch.zeros(0, h, w)) if output == "map" else None, rewards


def _short(value: Any, limit: int = 80) -> str:
    s = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return s if len(s) <= limit else s[:limit] + "..."


# --------------------------------------------------------------------------
# the client


class _Transient(Exception):
    """A failure worth retrying (no connection, timeout, 429 / 5xx)."""


class HttpReward:
    """A labeller that asks a reward server: ``labeller(images (B, 3, H, W), prompts) -> (maps (B, H, W), info)``.

    ``info["scalar"]`` holds the per-image rewards. ``attempts`` records the last
    1000 requests: ``{"batch", "attempt", "error"}`` (``error`` None on success);
    ``sleep`` (``time.sleep``) is what waits between attempts.
    """

    def __init__(self, url: str, *, output: str = "map", batch_size: int = 16, timeout_s: float = 60.0,
                 retries: int = 3, backoff_s: float = 1.0, max_backoff_s: float = 30.0):
        self.url = _endpoint(url)
        if output not in OUTPUTS:
            raise PxpoInputError("reward.kwargs.output", f"unknown output {output!r}", "use map (pixel rewards) or scalar (one per image)")
        self.output = output
        self.batch_size = _number(batch_size, "batch_size", int, 1)
        self.timeout_s = _number(timeout_s, "timeout_s", float, 1e-3)
        self.retries = _number(retries, "retries", int, 0)
        self.backoff_s = _number(backoff_s, "backoff_s", float, 0.0)
        self.max_backoff_s = _number(max_backoff_s, "max_backoff_s", float, 0.0)
        self.attempts: collections.deque[dict] = collections.deque(maxlen=1000)
        self.sleep = time.sleep

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        n, _, h, w = images.shape
        maps, rewards = [], []
        for first in range(0, n, self.batch_size):
            last = min(first + self.batch_size, n)
            where = f"batch {first // self.batch_size} (samples {first}-{last - 1})"
            body = request_body(images[first:last], list(prompts[first:last]), self.output)
            raw = self._send(body, first // self.batch_size, where)
            try:
                m, r = parse_predictions(json.loads(raw), last - first, (h, w), self.output)
            except json.JSONDecodeError:
                raise RewardServerError(self.url, f"{where}: the answer is not JSON: {_quote(raw)}", _FIX_FORMAT) from None
            except ValueError as exc:
                raise RewardServerError(self.url, f"{where}: {exc}", _FIX_FORMAT) from None
            maps.append(m if m is not None else constant_maps(torch.tensor(r), h, w))
            rewards += r
        out = torch.cat(maps) if maps else torch.zeros(0, h, w)
        return out.to(images.device), {"scalar": rewards}

    def _send(self, body: bytes, batch: int, where: str) -> bytes:
        """POST ``body``, retrying transient failures with exponential backoff; the answer's bytes."""
        t0 = time.monotonic()
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s))
            try:
                raw = self.post(body)
            except _Transient as exc:
                self.attempts.append({"batch": batch, "attempt": attempt, "error": str(exc)})
                last = exc
                continue
            self.attempts.append({"batch": batch, "attempt": attempt, "error": None})
            return raw
        n = self.retries + 1
        raise RewardServerError(
            self.url, f"{where}: {last} ({n} attempt{'s' * (n > 1)} in {time.monotonic() - t0:.1f} s)",
            "check that the reward model is served there and answers GET /ping "
            "(`mlflow models serve -m <model uri> -p <port> --env-manager local`), or raise reward.kwargs.retries / timeout_s",
        )

    def post(self, body: bytes) -> bytes:
        """One request: the answer's bytes; :class:`_Transient` or :class:`RewardServerError` on failure."""
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            try:
                text = exc.read()
            except (OSError, http.client.HTTPException):
                text = b""
            problem = f"HTTP {exc.code}: {_quote(text)}"
            if exc.code in RETRY_STATUS:
                raise _Transient(problem) from None
            raise RewardServerError(self.url, problem, _FIX_FORMAT) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise _Transient(f"no answer within {self.timeout_s:g} s (timeout_s)") from None
            raise _Transient(f"cannot connect ({exc.reason})") from None
        except (TimeoutError, socket.timeout):
            raise _Transient(f"no answer within {self.timeout_s:g} s (timeout_s)") from None
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            raise _Transient(f"connection lost ({type(exc).__name__}: {exc})") from None


_FIX_FORMAT = ("serve a pxpo reward model (pxpo.mlflow.reward_model.log_reward_model) or answer in the wire format "
               "of pxpo.rewards_http")


def _quote(raw: bytes) -> str:
    """The first bytes of a body, for messages: ``b'...'`` (``(empty body)`` when there are none).

    An MLflow error (JSON with ``message`` and ``stack_trace``) also gets the
    trace's last line, where the model's own exception is.
    """
    if not raw:
        return "(empty body)"
    text = repr(raw[:BODY_BYTES]) + (f" ... ({len(raw)} bytes)" if len(raw) > BODY_BYTES else "")
    try:
        err = json.loads(raw)
    except ValueError:
        return text
    lines = [ln.strip() for ln in str(err.get("stack_trace") or "").splitlines() if ln.strip()] if isinstance(err, dict) else []
    return f"{text}; the server's error: {lines[-1][:300]}" if lines else text


def _endpoint(url: Any) -> str:
    parsed = urllib.parse.urlparse(str(url)) if isinstance(url, str) else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise PxpoInputError("reward.kwargs.url", f"{url!r} is not an http(s) URL",
                             "give the reward server's address, e.g. http://127.0.0.1:5001 (POST /invocations is added)")
    if parsed.path in ("", "/"):
        parsed = parsed._replace(path="/invocations")
    return urllib.parse.urlunparse(parsed)


def _number(value: Any, name: str, kind: type, minimum: float):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and kind is int:
        ok = float(value).is_integer()
    if not ok or value < minimum:
        desc = "an integer" if kind is int else "a number"
        raise PxpoInputError(f"reward.kwargs.{name}", f"expected {desc} >= {minimum:g}, got {value!r}", f"set {name} to {desc} >= {minimum:g}")
    return kind(value)


@register("http")
def http_labeller(url: Any = None, output: str = "map", batch_size: int = 16, timeout_s: float = 60.0, retries: int = 3,
         backoff_s: float = 1.0, max_backoff_s: float = 30.0) -> LabelFn:
    """A reward model served over HTTP (MLflow's scoring protocol, e.g. `mlflow models serve`): maps or scalars per image.

    ``url``: the server (``/invocations`` is added to a bare address); ``output``:
    ``map`` (pixel rewards) or ``scalar`` (one per image, as a constant map);
    ``batch_size`` images per request; ``timeout_s`` per socket operation;
    ``retries`` with ``backoff_s * 2**k`` seconds between attempts. See :mod:`pxpo.rewards_http`.
    """
    if url is None:
        raise PxpoInputError("reward.kwargs.url", "the http labeller needs the server's URL", "set reward.kwargs.url, e.g. http://127.0.0.1:5001")
    return HttpReward(url, output=output, batch_size=batch_size, timeout_s=timeout_s, retries=retries,
                      backoff_s=backoff_s, max_backoff_s=max_backoff_s)
