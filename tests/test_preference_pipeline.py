"""Region-level preferences through the one CLI (sample pairs -> label -> train -> evaluate) (issue 24).

The same through kfp.local: tests/test_pipeline_local.py (it shares the default pipeline's workdir and cache)."""

import json
from pathlib import Path

from pxpo.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ["sample.pairs=true", "sample.pair_shared_steps=1", "sample.batch_size=4", "sample.num_steps=3", "train.batch_size=2",
         "train.learning_rate=1e-2", "train.probe_every=0", "reward.preference_scale=4"]


def test_staged_cli_samples_pairs_labels_preference_maps_and_trains(tmp_path, tiny_model_dir, capsys):
    from pxpo.trajectories import load_preference_maps, load_reward_maps

    over = [f"model.path={tiny_model_dir}", *PAIRS]
    traj = tmp_path / "traj"
    assert main(["sample", "--out", str(traj), "--", *over]) == 0
    assert main(["label", "--trajectories", str(traj), "--", *over]) == 0
    assert "2 preference maps" in capsys.readouterr().out
    maps, pairs, info = load_preference_maps(traj)
    rewards, _ = load_reward_maps(traj, 4, tuple(maps.shape[1:]))
    assert pairs.tolist() == [[0, 1], [2, 3]] and info["source"] == "model"
    want = ((rewards[0] - rewards[1]) * 4).clamp(-1, 1)  # m = clip((map_A - map_B) * scale, -1, 1)
    assert (maps[0] - want).abs().max() < 1e-6 and maps.abs().max() <= 1

    out = tmp_path / "policy"
    assert main(["train", "--trajectories", str(traj), "--out", str(out), "--", *over, "train.algorithm=d3po", "train.epochs=1"]) == 0
    printed = capsys.readouterr().out
    assert "preference accuracy" in printed, printed
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= hist[0]["pref_accuracy"] <= 1 and hist[0]["optimizer_steps"] == 2

    # a preference algorithm refuses unpaired trajectories, naming the file and the fix
    plain = tmp_path / "plain"
    base = [f"model.path={tiny_model_dir}", "sample.batch_size=4", "sample.num_steps=3", "train.batch_size=2"]
    assert main(["sample", "--out", str(plain), "--", *base]) == 0
    assert main(["label", "--trajectories", str(plain), "--", *base]) == 0
    capsys.readouterr()
    assert main(["train", "--trajectories", str(plain), "--out", str(tmp_path / "x"), "--", *over, "train.algorithm=d3po"]) == 2
    assert "sample.pairs=true" in capsys.readouterr().err

    ev = tmp_path / "eval"
    assert main(["evaluate", "--policy", str(out), "--out", str(ev), "--", *over, "evaluate.samples_per_prompt=2"]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert 0 <= metrics["pref_accuracy"] <= 1 and metrics["pref_pairs"] == metrics["num_samples"] // 2

