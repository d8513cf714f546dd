"""A reward model as an MLflow pyfunc, served like the policy with ``mlflow models serve``.

Log any labeller (a registered one by name, or a function / ``torch.nn.Module``)
and serve it; pxpo's ``http`` labeller (:mod:`pxpo.rewards_http`) then asks it
for maps or scalars. In python::

    import mlflow
    from pxpo.mlflow.reward_model import log_reward_model

    with mlflow.start_run():
        uri = log_reward_model("brightness_target", {"layout": "left_bright"})  # models:/m-...
        # or log_reward_model(fn): fn(images (B, 3, H, W) in [0, 1], prompts) -> maps (B, H, W),
        # (maps, info) or scalars (B,), e.g. a torch module such as
        # pxpo.core.rewards.learned.load_reward_model("models/reward"); pickled with cloudpickle,
        # weights included (the modules it needs must be importable where it is served, or be
        # given in code_paths)

or from the shell (prints the model URI and the serve command)::

    python -m pxpo.mlflow.reward_model brightness_target --kwargs '{"layout": "left_bright"}' \\
        --tracking-uri sqlite:///mlflow/mlruns.db [--register pxpo-reward]

then::

    MLFLOW_TRACKING_URI=sqlite:///mlflow/mlruns.db mlflow models serve -m models:/m-... -p 5001 --env-manager local
    pxpo label --trajectories work/trajectories reward.name=http reward.kwargs.url=http://127.0.0.1:5001

The model's input is the wire format of :mod:`pxpo.rewards_http`: a DataFrame
with columns ``image`` (base64 PNG) and ``prompt`` (string); the param
``output`` (``map``, the default, or ``scalar``); the output a DataFrame with
``reward`` (a float per image: a scalar labeller's value, else the map's pixel
mean) and, with ``output: map``, ``map`` (``H x W`` nested lists of floats).
A labeller by name is logged as code (:data:`MODEL_CODE`, the labeller's name
and kwargs in the model config); the ``pxpo`` package is bundled under ``code/``
either way, so the model loads where pxpo is not installed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from ..errors import PxpoInputError

MODEL_CODE = '''"""pxpo reward model (MLflow models-from-code entry point)."""
import mlflow

from pxpo.mlflow.reward_model import RewardModel

mlflow.models.set_model(RewardModel())
'''

#: what the model needs at load time, pinned to the versions it was logged with
REQUIREMENTS = ["torch", "numpy", "pillow", "pandas"]


def signature():
    """Inputs ``image`` (string, base64 PNG) and ``prompt`` (string); outputs ``reward`` and ``map``; param ``output``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image"), ColSpec("string", "prompt", required=False)]),
        outputs=Schema([ColSpec("double", "reward"), ColSpec(Array(Array("double")), "map", required=False)]),
        params=ParamSchema([ParamSpec("output", "string", "map")]),
    )


class RewardModel(mlflow.pyfunc.PythonModel):
    """pyfunc around a labeller: ``predict(df[image, prompt], params={"output": ...}) -> df[reward, map]``.

    Built with ``fn`` (any callable, see :func:`score`) or, loaded from code,
    from the model config's ``labeller`` and ``kwargs`` (the registry's
    labellers, the library's included).
    """

    def __init__(self, fn: Callable | None = None):
        self.fn = fn

    def load_context(self, context):
        if self.fn is None:
            from ..labellers import make_labeller  # the registry, with the library's labellers registered

            cfg = dict(context.model_config or {})
            self.fn = make_labeller(cfg["labeller"], **dict(cfg.get("kwargs") or {}))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from ..rewards_http import OUTPUTS, decode_images

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in df.columns:
            raise PxpoInputError("model input", f"no `image` column (columns: {list(df.columns)})",
                                 "send columns image (base64 PNG) and prompt (see pxpo.rewards_http)")
        output = (params or {}).get("output") or "map"
        if output not in OUTPUTS:
            raise PxpoInputError("params.output", f"unknown output {output!r}", "use map or scalar")
        images = decode_images(list(df["image"]))
        prompts = [str(p) for p in df["prompt"]] if "prompt" in df.columns else [""] * len(df)
        maps, rewards = score(self.fn, images, prompts)
        out = {"reward": rewards}
        if output == "map":
            out["map"] = [m.tolist() for m in maps]
        return pd.DataFrame(out)


def score(fn: Callable, images, prompts: list[str]):
    """``fn(images, prompts)`` -> (maps ``(B, H, W)`` float32, rewards: ``B`` floats).

    ``fn`` returns maps ``(B, H, W)``, ``(maps, info)`` (a labeller) or scalars
    ``(B,)`` (a constant map each). A reward is the scalar, else the map's mean.
    """
    import torch

    from ..core.rewards import constant_maps

    b, _, h, w = images.shape
    with torch.no_grad():
        out = fn(images, prompts)
    if isinstance(out, tuple):
        out = out[0]
    t = torch.as_tensor(out).detach().float().cpu()
    if tuple(t.shape) in ((b,), (b, 1)):
        return constant_maps(t.reshape(b), h, w), [float(v) for v in t.reshape(b)]
    if tuple(t.shape) != (b, h, w):
        raise PxpoInputError("reward model", f"returned shape {tuple(t.shape)} for images {tuple(images.shape)}",
                             "return maps (B, H, W), (maps, info) or scalars (B,)")
    return t, [float(v) for v in t.double().mean(dim=(1, 2))]


def _requirements(extra: list[str]) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for name in REQUIREMENTS:
        try:
            reqs.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs + list(extra)


def _model_args(labeller: str | Callable, kwargs: dict | None, tmp: Path, code_paths: list | None,
                extra_requirements: list[str]) -> dict:
    """The keyword arguments of ``mlflow.pyfunc.log_model`` / ``save_model`` for a labeller."""
    import pxpo

    code = tmp / "pxpo"
    shutil.copytree(Path(pxpo.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    args: dict[str, Any] = {"code_paths": [str(code), *map(str, code_paths or [])], "signature": signature(),
                            "pip_requirements": _requirements(extra_requirements)}
    if isinstance(labeller, str):
        from ..labellers import make_labeller

        make_labeller(labeller, **dict(kwargs or {}))  # a bad name or argument fails here, not in the server
        script = tmp / "pxpo_reward_model.py"
        script.write_text(MODEL_CODE)
        args.update(python_model=str(script), model_config={"labeller": labeller, "kwargs": dict(kwargs or {})},
                    metadata={"pxpo_version": pxpo.__version__, "labeller": labeller, "kwargs": json.dumps(kwargs or {})})
    elif callable(labeller):
        if kwargs:
            raise PxpoInputError("log_reward_model", "kwargs are for a labeller given by name", "bind them in the function")
        args.update(python_model=RewardModel(labeller),
                    metadata={"pxpo_version": pxpo.__version__, "labeller": getattr(labeller, "__name__", type(labeller).__name__)})
    else:
        raise PxpoInputError("log_reward_model", f"labeller is a {type(labeller).__name__}",
                             "pass a labeller name (`pxpo labellers`) or a function of (images, prompts)")
    return args


def log_reward_model(labeller: str | Callable, kwargs: dict | None = None, *, name: str = "reward_model",
                     registered_model_name: str | None = None, code_paths: list | None = None,
                     extra_requirements: list[str] = ()) -> str:
    """Log a labeller as a pyfunc reward model (in the active run, if any); its model URI (``models:/m-...``).

    Args:
        labeller: a registered labeller's name (``kwargs`` are its arguments) or a
            callable ``fn(images, prompts)`` (see :func:`score`).
        registered_model_name: also register it under this name (serve ``models:/<name>/<version>``).
        code_paths: more code to bundle (the modules a pickled function needs).
        extra_requirements: pip requirements beyond torch, numpy, pillow, pandas.

    Raises:
        PxpoInputError: an unknown labeller or bad arguments (built once here), not a labeller.
    """
    import mlflow

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        args = _model_args(labeller, kwargs, Path(tmp), code_paths, list(extra_requirements))
        info = mlflow.pyfunc.log_model(name=name, registered_model_name=registered_model_name, **args)
    return info.model_uri


def save_reward_model(path: str | Path, labeller: str | Callable, kwargs: dict | None = None, *,
                      code_paths: list | None = None, extra_requirements: list[str] = ()) -> Path:
    """Save the reward model to a local directory (no tracking server); serve it with ``mlflow models serve -m <path>``."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        args = _model_args(labeller, kwargs, Path(tmp), code_paths, list(extra_requirements))
        mlflow.pyfunc.save_model(str(path), **args)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    """``python -m pxpo.mlflow.reward_model NAME [--kwargs JSON] [--tracking-uri URI] [--register NAME] [--save DIR]``."""
    p = argparse.ArgumentParser(prog="python -m pxpo.mlflow.reward_model", description="Log a labeller as a pyfunc reward model to serve over HTTP.")
    p.add_argument("labeller", help="a labeller name (`pxpo labellers`)")
    p.add_argument("--kwargs", default="{}", help="its arguments as JSON, e.g. '{\"layout\": \"left_bright\"}'")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite under ./mlflow")
    p.add_argument("--experiment", default="reward-models")
    p.add_argument("--register", default=None, help="also register it under this model name")
    p.add_argument("--save", default=None, help="save to this directory instead of logging to MLflow")
    args = p.parse_args(argv)
    try:
        try:
            kwargs = json.loads(args.kwargs)
        except json.JSONDecodeError as exc:
            raise PxpoInputError("--kwargs", f"not JSON ({exc})", "pass a JSON object, e.g. '{\"layout\": \"left_bright\"}'") from None
        if args.save:
            uri, env = str(save_reward_model(args.save, args.labeller, kwargs).resolve()), ""
        else:
            import mlflow

            from .tracking import default_tracking_uri, ensure_experiment

            tracking = args.tracking_uri or default_tracking_uri(Path("mlflow"))
            mlflow.set_tracking_uri(tracking)
            with mlflow.start_run(experiment_id=ensure_experiment(args.experiment), run_name=f"reward-{args.labeller}"):
                uri = log_reward_model(args.labeller, kwargs, registered_model_name=args.register)
            env = f"MLFLOW_TRACKING_URI={tracking} "
    except PxpoInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(uri)
    print(f"serve it: {env}mlflow models serve -m {uri} -p 5001 --env-manager local", file=sys.stderr)
    print("label with it: reward.name=http reward.kwargs.url=http://127.0.0.1:5001", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
