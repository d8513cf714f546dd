"""The core imports no I/O adapters (mlflow, kfp, dvc, great_expectations)."""

import subprocess
import sys

FORBIDDEN = ["mlflow", "kfp", "dvc", "great_expectations", "accelerate"]


def test_core_imports_no_adapters():
    code = (
        "import sys, pxpo.core.ddim, pxpo.core.sampling, pxpo.core.losses, pxpo.core.advantages, pxpo.core.rewards, pxpo.core.preference;"
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
