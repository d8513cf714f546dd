"""Rewards users bring without editing pxpo: installed plugins (entry points) and package.module:factory references.

A plugin package is written to a temporary folder with a ``*.dist-info`` (METADATA and
entry_points.txt) beside it and put on ``sys.path``: importlib.metadata finds it as an
installed distribution. One test also pip-installs a real package into a fresh virtual
environment and runs pxpo there in a subprocess.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

from pxpo.cli import main
from pxpo.config import load_config
from pxpo.core import rewards as R
from pxpo.errors import PxpoInputError
from pxpo.labellers import make_gold, make_reward

PLUGIN = '''
"""A team's own rewards (a test plugin)."""
import torch


def make_left_brightness(scale=1.0):
    """Mean brightness of the left half, times scale: one differentiable scalar per image."""

    def fn(images, prompts):
        return scale * images[..., : images.shape[-1] // 2].mean(dim=(1, 2, 3))

    return fn


def make_red_map():
    """The red channel as a map, with an info entry."""
    return lambda images, prompts: (images[:, 0], {"red": images[:, 0].mean((1, 2))})


def make_bad_shape():
    """Maps of the wrong size."""
    return lambda images, prompts: torch.zeros(images.shape[0], 3, 3)


NOT_A_FACTORY = 3
'''

ENTRY_POINTS = """\
[pxpo.labellers]
plug_left = pxpo_test_plugin:make_left_brightness
plug_red = pxpo_test_plugin:make_red_map
plug_bad = pxpo_test_plugin:make_bad_shape
"""


def _dist(root: Path, name: str, entry_points: str, modules: dict[str, str]) -> Path:
    """``root`` with the modules and ``<name>-0.1.dist-info`` (what pip leaves in site-packages)."""
    for rel, text in modules.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    return root


@pytest.fixture(scope="session")
def plugin_root(tmp_path_factory):
    return _dist(tmp_path_factory.mktemp("plugin"), "pxpo-test-plugin", ENTRY_POINTS,
                 {"pxpo_test_plugin/__init__.py": PLUGIN, "pxpo_test_plugin/broken.py": "import pxpo_no_such_dependency\n"})


@pytest.fixture
def plugin(plugin_root, monkeypatch):
    """The plugin installed (on sys.path) for one test; its modules forgotten afterwards."""
    monkeypatch.syspath_prepend(str(plugin_root))
    yield plugin_root
    for m in [m for m in sys.modules if m.startswith("pxpo_test_plugin")]:
        del sys.modules[m]


def _images(b=2, seed=0):
    return torch.rand(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# ----- names, contract, errors -------------------------------------------------------------------------


def test_an_entry_point_and_a_module_function_give_the_same_labeller(plugin):
    x = _images()
    want = 2.0 * x[..., :8].mean(dim=(1, 2, 3))
    for name in ("plug_left", "pxpo_test_plugin:make_left_brightness"):
        cfg = load_config(None, [f"reward.name={name}", "reward.kwargs={scale: 2.0}"])
        maps, info = make_reward(cfg.reward)(x, ["a", "b"])
        assert maps.shape == (2, 16, 16) and maps.dtype == torch.float32  # scalars became constant maps
        torch.testing.assert_close(maps, want[:, None, None].expand(2, 16, 16))
        assert info["scalar"] == pytest.approx(want.tolist())
    assert R.origin("plug_left") == "entry point pxpo-test-plugin (pxpo_test_plugin:make_left_brightness)"
    assert R.origin("pxpo_test_plugin:make_left_brightness") == "module:function"
    assert R.origin("brightness_target") == "built-in"


def test_a_map_plugin_keeps_its_map_and_info(plugin):
    x = _images()
    maps, info = R.make_labeller("plug_red")(x, ["a", "b"])
    torch.testing.assert_close(maps, x[:, 0])
    assert info["red"] == pytest.approx(x[:, 0].mean((1, 2)).tolist())  # a tensor in info becomes a list


def test_the_adapters_take_a_plugin_as_base(plugin):
    """attribution gives a differentiable plugin pixel credit; occlusion works on it too."""
    x, prompts = _images(), ["a", "b"]
    r = x[..., :8].mean(dim=(1, 2, 3)).double()
    for name in ("attribution", "occlusion"):
        maps, info = R.make_labeller(name, base="plug_left", patch=2)(x, prompts)
        torch.testing.assert_close(maps.double().mean((1, 2)), r, rtol=1e-5, atol=1e-6)
        right = maps[:, :, 9:]  # the reward ignores the right half: uniform credit there (past the window)
        assert torch.allclose(right, right[:, :1, :1], atol=1e-6) and not torch.allclose(maps[:, :, :8], maps[:, :1, :1])


def test_config_checks_names_without_importing(plugin):
    load_config(None, ["reward.name=some_team.rewards:make", "reward.kwargs={}"])  # well-formed: imported when built
    assert "some_team" not in sys.modules
    with pytest.raises(PxpoInputError, match=r"reward\.name: 'a b:c' is not a 'package.module:factory'"):
        load_config(None, ["reward.name='a b:c'"])
    with pytest.raises(PxpoInputError, match="unknown labeller 'plug_nope'.*installed plugin's name.*package.module:factory"):
        load_config(None, ["reward.name=plug_nope"])


@pytest.mark.parametrize("name, kwargs, match", [
    ("some_team.rewards:make", {}, r"plugin 'some_team.rewards:make' \(module:function\) failed to load: ModuleNotFoundError.*Fix: install the package"),
    ("pxpo_test_plugin:nope", {}, "failed to load: AttributeError"),
    ("pxpo_test_plugin:NOT_A_FACTORY", {}, "is a int, not a factory"),
    ("plug_left", {"colour": 1}, r"reward\.kwargs\.colour: labeller 'plug_left' \(entry point pxpo-test-plugin .*rejected argument"),
])
def test_a_plugin_that_does_not_load_or_build_names_itself(plugin, name, kwargs, match):
    with pytest.raises(PxpoInputError, match=match):
        R.make_labeller(name, **kwargs)


def test_a_plugin_returning_the_wrong_shape_says_what_came_back(plugin):
    fn = make_gold(load_config(None, ["evaluate.gold=[{name: plug_bad}]"]).evaluate)["plug_bad"]
    with pytest.raises(PxpoInputError) as e:
        fn(_images(), ["a", "b"])
    msg = str(e.value)
    assert "labeller 'plug_bad' (entry point pxpo-test-plugin (pxpo_test_plugin:make_bad_shape))" in msg
    assert "returned a tensor of shape (2, 3, 3) for images (2, 3, 16, 16)" in msg and "Fix: return (maps, info)" in msg


def test_pxpo_labellers_says_where_each_comes_from(plugin, capsys):
    code, out, err = _run(["labellers", "evaluate.gold=[{name: 'pxpo_test_plugin:make_red_map'}]"], capsys)
    assert code == 0, err
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert lines["brightness_target"].endswith("[built-in]")
    assert lines["plug_left"].endswith("[entry point pxpo-test-plugin (pxpo_test_plugin:make_left_brightness)]")
    assert "Mean brightness of the left half" in lines["plug_left"]
    assert lines["pxpo_test_plugin:make_red_map"].endswith("[module:function]")


def test_a_broken_or_ambiguous_plugin_exits_2_naming_it(plugin, tmp_path, monkeypatch, capsys):
    broken = _dist(tmp_path / "b", "pxpo-broken-plugin", "[pxpo.labellers]\nplug_broken = pxpo_test_plugin.broken:make\n"
                   "plug_left = other_team:make\nbrightness_target = other_team:bright\n", {})
    monkeypatch.syspath_prepend(str(broken))
    code, out, err = _run(["labellers"], capsys)
    assert code == 2 and "brightness_target" in out  # the rest is listed
    assert "plug_broken" in out and "brightness_target (not used)" in out and "shadowed by the built-in" in out
    assert "plugin 'plug_broken' (entry point pxpo-broken-plugin (pxpo_test_plugin.broken:make)) failed to load: ModuleNotFoundError" in err
    with pytest.raises(PxpoInputError, match="plug_left.*several installed distributions.*pxpo-test-plugin.*pxpo-broken-plugin|plug_left.*several.*pxpo-broken-plugin.*pxpo-test-plugin"):
        R.make_labeller("plug_left")


def test_a_plugin_name_travels_unchanged_through_the_kfp_params(plugin, tmp_path):
    """The pipeline passes each task its params sections as YAML strings (section_yaml); the task writes them
    as one params.yaml (params_text) and loads it with --sections: the names come back as they were."""
    from pxpo.config import section_yaml
    from pxpo.kubeflow.launcher import STAGE_SECTIONS, params_text

    cfg = load_config(None, ["reward.name=some_team.rewards:make_score", "reward.kwargs={model: team/clip}",
                             "evaluate.gold=[{name: plug_red, label: red}, {name: 'some_team.rewards:gold_score'}]"])
    texts = {s: section_yaml(cfg, [s]) for s in STAGE_SECTIONS["evaluate"]}
    assert "some_team.rewards:make_score" in texts["reward"]
    p = tmp_path / "params.yaml"
    p.write_text(params_text(texts))
    back = load_config(p, [], sections=list(texts))
    assert back.reward == cfg.reward and back.evaluate.gold == cfg.evaluate.gold
    assert [g.key for g in back.evaluate.gold] == ["red", "gold_score"]  # a reference's key: its function's name


# ----- through the stages: pxpo label, pxpo run, pxpo evaluate (gold) ---------------------------------


def test_plugins_through_label_run_and_gold(plugin, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A module:function reward labels (pxpo label) and trains (pxpo run, one epoch); an entry-point gold reward
    is evaluated;
    a plugin returning the wrong shape stops `pxpo label` with exit 2 and nothing written."""
    monkeypatch.chdir(tmp_path)  # no ./params.yaml
    fast = [f"model.path={tiny_model_dir}", "sample.batch_size=4", "sample.num_steps=3", "train.batch_size=2"]
    reward = ["reward.name=pxpo_test_plugin:make_left_brightness", "reward.kwargs={scale: 1.0}"]
    t = tmp_path / "traj"
    assert _run(["sample", "--quiet", "--out", str(t), *fast], capsys)[0] == 0
    code, _, err = _run(["label", "--quiet", "--trajectories", str(t), *fast, "reward.name=plug_bad", "reward.kwargs={}"], capsys)
    assert code == 2 and "plug_bad" in err and "shape (4, 3, 3)" in err
    assert not (t / "reward_maps.safetensors").exists()
    code, out, err = _run(["label", "--quiet", "--trajectories", str(t), *fast, *reward], capsys)
    assert code == 0 and "labelled 4 samples with pxpo_test_plugin:make_left_brightness" in out, err

    run = tmp_path / "run"
    code, out, err = _run(["run", "--quiet", *fast, *reward, "train.epochs=1", f"output_dir={run}"], capsys)
    assert code == 0, err
    hist = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 1 and 0.0 < hist[0]["reward_mean"] < 1.0

    # the evaluation `pxpo evaluate` runs (without its Great Expectations checks, a minute on this machine)
    from pxpo.evaluate import evaluate, summarize

    cfg = load_config(None, [*fast, *reward, "evaluate.gold=[{name: plug_red, label: red}]"])
    metrics = evaluate(cfg, str(run), tmp_path / "eval", samples_per_prompt=1)
    assert set(metrics["gold"]["red"]) == {"base", "policy"} and metrics["gold_red"] == metrics["gold"]["red"]["policy"]
    assert "gold red" in summarize(metrics) and json.loads((tmp_path / "eval" / "metrics.json").read_text())["gold"] == metrics["gold"]


# ----- a real install into a fresh environment -----------------------------------------------------------


PIP_PLUGIN = {
    "pyproject.toml": """\
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "pxpo-pip-plugin"
        version = "0.1"

        [project.entry-points."pxpo.labellers"]
        pip_left = "pxpo_pip_plugin:make"

        [tool.setuptools]
        packages = ["pxpo_pip_plugin"]
        """,
    "pxpo_pip_plugin/__init__.py": '''\
        def make(scale=1.0):
            """Left-half brightness from an installed package."""
            return lambda images, prompts: scale * images[..., : images.shape[-1] // 2].mean(dim=(1, 2, 3))
        ''',
}

CHILD = """\
import torch
from pxpo.config import load_config
from pxpo.labellers import make_reward
cfg = load_config(None, ["reward.name=pip_left", "reward.kwargs={scale: 3.0}"])
x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
maps, info = make_reward(cfg.reward)(x, ["a", "b"])
assert torch.allclose(maps.mean((1, 2)), 3.0 * x[..., :4].mean((1, 2, 3)))
print("OK", maps.shape, info["scalar"])
"""


def _bundled_pip() -> str:
    """pip run from the wheel ensurepip ships (``python <wheel>/pip``): ensurepip would also install an old
    setuptools into the venv, shadowing this environment's (the build backend)."""
    import ensurepip

    wheels = sorted((Path(ensurepip.__file__).parent / "_bundled").glob("pip-*.whl"))
    if not wheels:
        import prereq

        prereq.missing("neither uv nor ensurepip's bundled pip is available to install the plugin offline")
    return str(wheels[-1] / "pip")


def _venv_with_pxpo(root: Path) -> Path:
    """A fresh virtual environment whose interpreter also sees this one's packages (pxpo, torch, setuptools).

    ``--system-site-packages`` of a venv made from a venv reaches the base interpreter's site-packages,
    not this environment's; a .pth line adds this environment's site-packages (its .pth files too, so the
    editable pxpo)."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(root)], check=True)
    py = root / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "_pxpo_parent_env.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    return py


def test_a_pip_installed_plugin_supplies_a_labeller_by_name(tmp_path):
    """The issue's done-when: a plugin package installed into a temporary environment supplies a labeller by
    reward.name without touching pxpo. Installed offline with uv (without uv: pip from ensurepip's wheel)."""
    src = tmp_path / "plugin"
    for rel, text in PIP_PLUGIN.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(textwrap.dedent(text))
    uv = shutil.which("uv")
    py = _venv_with_pxpo(tmp_path / "venv")
    env = {**os.environ, "UV_NO_CACHE": "1", "PIP_NO_CACHE_DIR": "1", "HF_HUB_OFFLINE": "1"}
    install = [uv, "pip", "install", "--python", str(py)] if uv else [str(py), _bundled_pip(), "install", "-q"]
    done = subprocess.run([*install, "--no-index", "--no-build-isolation", "--no-deps", str(src)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    with pytest.raises(ImportError):  # not in pxpo's own environment
        __import__("pxpo_pip_plugin")

    child = subprocess.run([str(py), "-c", CHILD], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert child.returncode == 0 and child.stdout.startswith("OK torch.Size([2, 8, 8])"), child.stderr[-2000:]
    listing = subprocess.run([str(py), "-m", "pxpo.cli", "labellers"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr[-2000:]
    line = next(x for x in listing.stdout.splitlines() if x.startswith("pip_left"))
    assert "Left-half brightness from an installed package." in line and line.endswith("[entry point pxpo-pip-plugin (pxpo_pip_plugin:make)]")
