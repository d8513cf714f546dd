"""One line per task for ``pxpo pipeline run --local``; every task's full log in a file.

``kfp.local`` writes everything to ``sys.stdout``: its own log records (a
``logging.StreamHandler(sys.stdout)`` made per task), and each task's child
process output, line by line, with ``print`` (the executor input, with the
params, included). :class:`TaskProgress` stands in for ``sys.stdout`` while
the pipeline runs, splits that stream at kfp's "Executing task 'x'" and
"Task 'x' finished with status S" records, writes each task's lines to
``<log_dir>/<task>.log`` (and all of them to ``<log_dir>/pipeline.log``), and
prints to the real terminal one line per task::

    [ 3/10] train              SUCCESS    41.2s  trained 1 round(s) to epoch 1: reward 0.4551

The summary is the line the launcher marks with :data:`SUMMARY_PREFIX`
(the stage's last line of output). On a terminal the task that is running
is shown on a line that the finished task's line replaces.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from .launcher import SUMMARY_PREFIX

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '([^']+)'")
_END = re.compile(r"Task '([^']+)' finished with status (\w+)")
_CACHED = re.compile(r"Task '?([\w\-.]+)'? cache hit")
TAIL_LINES = 25  # of a failed task's log, repeated on the terminal


def count_tasks(pipeline) -> int | None:
    """Tasks of a compiled kfp pipeline (``GraphComponent``), sub-DAGs included; None if unknown."""
    try:
        spec = pipeline.pipeline_spec
    except AttributeError:
        return None

    def count(dag) -> int:
        n = 0
        for task in dag.tasks.values():
            comp = spec.components.get(task.component_ref.name)
            n += count(comp.dag) if comp is not None and comp.HasField("dag") else 1
        return n

    return count(spec.root.dag)


def _safe(name: str) -> str:
    return re.sub(r"[^\w\-.]", "_", name) or "task"


class TaskProgress:
    """A text stream for ``sys.stdout`` during a local run (see the module docstring).

    Args:
        log_dir: where ``<task>.log`` and ``pipeline.log`` go (created).
        total: the number of tasks, for the ``[k/N]`` indicator (None: ``[k]``).
        out: the real terminal stream.
    """

    def __init__(self, log_dir: Path, total: int | None, out=None):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.total = total
        self.out = out or sys.stdout
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self.all = (self.log_dir / "pipeline.log").open("w", encoding="utf-8")
        self.buf = ""
        self.done = 0
        self.task: str | None = None
        self.task_file = None
        self.started = 0.0
        self.summary = ""
        self.failed: list[str] = []
        self.lines: list[str] = []  # the printed per-task lines

    # ---- the stream interface kfp writes to
    def write(self, text: str) -> int:
        self.buf += text
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            self._line(line)
        return len(text)

    def flush(self) -> None:
        self.all.flush()
        if self.task_file:
            self.task_file.flush()

    def isatty(self) -> bool:
        return False  # kfp: no colours into the log files

    # ---- parsing
    def _line(self, raw: str) -> None:
        line = _ANSI.sub("", raw)
        self.all.write(line + "\n")
        m = _START.search(line)
        if m:
            self._start(m.group(1))
        if self.task_file:
            self.task_file.write(line + "\n")
        if SUMMARY_PREFIX in line:
            self.summary = line.split(SUMMARY_PREFIX, 1)[1].strip()
        m = _END.search(line)
        if m:
            self._finish(m.group(1), m.group(2))
            return
        m = _CACHED.search(line)
        if m:
            self._emit(m.group(1), "CACHED", 0.0, "outputs reused from the local cache")

    def _start(self, task: str) -> None:
        self._close_task()
        self.task, self.started, self.summary = task, time.perf_counter(), ""
        self.task_file = (self.log_dir / f"{_safe(task)}.log").open("w", encoding="utf-8")
        if self.tty:
            self.out.write(f"{self._counter(self.done + 1)} {task:<18} running ...\r")
            self.out.flush()

    def _finish(self, task: str, status: str) -> None:
        seconds = time.perf_counter() - self.started
        log = self.log_dir / f"{_safe(task)}.log"
        self._close_task()
        summary = self.summary
        if status != "SUCCESS":
            self.failed.append(task)
            summary = f"see {log}"
        self._emit(task, status, seconds, summary)
        if status != "SUCCESS" and log.is_file():
            tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-TAIL_LINES:]
            self.out.write("".join(f"    | {ln}\n" for ln in tail))
            self.out.flush()

    def _emit(self, task: str, status: str, seconds: float, summary: str) -> None:
        self.done += 1
        text = f"{self._counter(self.done)} {task:<18} {status:<8} {seconds:7.1f}s  {summary}".rstrip()
        self.lines.append(text)
        self.out.write(("\r\x1b[K" if self.tty else "") + text + "\n")
        self.out.flush()

    def _counter(self, k: int) -> str:
        if self.total:
            w = len(str(self.total))
            return f"[{k:>{w}}/{self.total}]"
        return f"[{k}]"

    def _close_task(self) -> None:
        if self.task_file:
            self.task_file.close()
        self.task_file, self.task = None, None

    def close(self) -> None:
        if self.buf:
            self._line(self.buf)
            self.buf = ""
        self._close_task()
        self.all.close()

    def task_log(self, task: str) -> Path:
        return self.log_dir / f"{_safe(task)}.log"
