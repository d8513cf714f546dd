"""human/dvc.yaml (the human-in-the-loop stage set) lists the code each stage runs, like dvc.yaml."""

import shlex
from pathlib import PurePosixPath

import yaml

import test_dvc_deps as t

HUMAN = t.ROOT / "human" / "dvc.yaml"


def test_human_stages_list_the_project_modules_they_run():
    stages = yaml.safe_load(HUMAN.read_text())["stages"]
    assert list(stages) == ["human_push", "human_pull", "human_train", "human_evaluate", "human_register"]
    missing = {}
    for name, stage in stages.items():
        assert stage["wdir"] == "..", name  # paths are relative to the repository root
        argv = shlex.split(stage["cmd"])
        files = t.import_closure(t.entry_modules(argv))
        deps = [PurePosixPath(str(d if isinstance(d, str) else next(iter(d))).rstrip("/")) for d in stage["deps"]]
        miss = [str(f.relative_to(t.ROOT).as_posix()) for f in files if not t.covered(PurePosixPath(f.relative_to(t.ROOT).as_posix()), deps)]
        if miss:
            missing[name] = miss
    assert not missing, f"human/dvc.yaml stages miss code deps: {missing}"
    assert "src/pxpo/stages/label_studio.py" in stages["human_pull"]["deps"] and stages["human_pull"]["always_changed"]
    assert "work/human/labelled" in stages["human_train"]["deps"]
