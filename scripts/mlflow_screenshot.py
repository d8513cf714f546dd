"""Screenshot a pxpo run's MLflow page (the README's docs/images/mlflow_run.png) with headless Chromium.

    .venv/bin/python scripts/mlflow_screenshot.py sqlite:///runs/kfp-local/mlflow/mlflow.db docs/images/mlflow_run.png

Starts ``mlflow ui`` on the store, picks the newest run that has probe-sample images
(``images/probe_samples+step+N...``), opens that run's page at its last probe image and
saves a 1400 x 1000 screenshot. Needs /usr/bin/chromium (Debian: apt-get install chromium).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _newest_probe_image(uri: str) -> tuple[str, str, str]:
    """(experiment id, run id, artifact path of the last probe_samples image) of the newest run that has one."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["attributes.start_time DESC"])
    for run in runs:
        files = [f.path for f in client.list_artifacts(run.info.run_id, "images") if "probe_samples+step+" in f.path]
        pngs = [f for f in files if f.endswith(".png")]
        if pngs:
            last = max(pngs, key=lambda p: int(p.split("+step+")[1].split("+")[0]))
            return run.info.experiment_id, run.info.run_id, last
    raise SystemExit(f"no run in {uri} has probe_samples images (train.probe_every > 0 and pxpo register, or pxpo run --tracking-uri)")


def main(uri: str, out: str) -> None:
    exp, run, artifact = _newest_probe_image(uri)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/#/experiments/{exp}/runs/{run}/artifacts/{artifact}"
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["/usr/bin/chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1400,1000", "--virtual-time-budget=20000", f"--screenshot={Path(out).resolve()}", url],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
        print(f"wrote {out}: {url}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main(*sys.argv[1:3])
