"""run-local's short log: kfp.local prints every step's whole output (executor-input JSON,
TensorFlow's start-up lines, each rank's progress); this keeps all of it, one file per step,
and shows the reader what a run is doing: each step's end, rank 0's training lines (about
ten progress lines and one per validation), and on a failure the failed step's error lines.

kfp.local writes through ``print`` and a logging handler on ``sys.stdout``; ``StepLog`` is
what ``sys.stdout`` is while the pipeline runs (contextlib.redirect_stdout).
"""
import io
import os
import re
import time
from typing import Dict, Optional, TextIO

ANSI = re.compile(r"\x1b\[[0-9;]*m")
TASK_START = re.compile(r"Executing task '([\w-]+)'")
TASK_END = re.compile(r"Task '([\w-]+)' finished with status (\w+)")
# Rank 0's (or the only process's) lines from the training loop worth reading as they come.
TRAIN_LINE = re.compile(r"^(?:\[rank 0\] )?\S+ \S+ INFO hrnet\.train\.loop: "
                        r"(?P<what>training |step (?P<step>\d+)/(?P<total>\d+) |validation at step )")
# "hrnet train: error: ...", the executor's "[KFP Executor ... ERROR]: ..." and our loggers' ERROR lines.
ERROR_LINE = re.compile(r": error: |ERROR\]: | ERROR hrnet")
PROGRESS_LINES = 10  # step lines shown per training run; all go to its log
FAILED_LINES = 12


class StepLog(io.TextIOBase):
    """Splits the pipeline's output: all of it to ``folder/<step>.log`` (and the lines outside
    any step to ``folder/pipeline.log``), the short account to ``console``."""

    def __init__(self, folder: str, console: TextIO):
        self.folder, self.console = folder, console
        os.makedirs(folder, exist_ok=True)
        self._partial = ""
        self._files: Dict[str, TextIO] = {}
        self._step: Optional[str] = None
        self._started: Dict[str, float] = {}
        self._shown_tenth = -1

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def path(self, step: Optional[str]) -> str:
        return os.path.join(self.folder, f"{step or 'pipeline'}.log")

    def _file(self, step: Optional[str]) -> TextIO:
        key = step or "pipeline"
        if key not in self._files:
            self._files[key] = open(self.path(step), "a", encoding="utf-8")
        return self._files[key]

    def _say(self, line: str) -> None:
        self.console.write(line + "\n")
        self.console.flush()

    def _line(self, raw: str) -> None:
        line = ANSI.sub("", raw)
        start, end = TASK_START.search(line), TASK_END.search(line)
        if start:
            self._step = start.group(1)
            self._started[self._step] = time.monotonic()
            self._shown_tenth = -1
        f = self._file(self._step)
        f.write(line + "\n")
        f.flush()
        if end:
            self._finished(end.group(1), end.group(2))
            self._step = None
        elif self._step:
            self._maybe_show(line.strip())

    def _maybe_show(self, line: str) -> None:
        m = TRAIN_LINE.match(line)
        if not m:
            return
        if m.group("step"):
            tenth = int(m.group("step")) * PROGRESS_LINES // max(1, int(m.group("total")))
            if tenth == self._shown_tenth:
                return
            self._shown_tenth = tenth
        self._say("    " + line.split(": ", 1)[1])

    def _finished(self, step: str, status: str) -> None:
        seconds = time.monotonic() - self._started.get(step, time.monotonic())
        if status == "SUCCESS":
            self._say(f"  {step:<20} done in {seconds:.0f} s")
            return
        self._files.pop(step).close()
        with open(self.path(step), encoding="utf-8") as f:
            lines = [ln.strip() for ln in f.read().splitlines()]
        # Our commands end with one "<command>: error: ..." line; the rest is the executor's traceback.
        said = [ln for ln in lines if ERROR_LINE.search(ln) and not TASK_END.search(ln)]
        self._say(f"  {step:<20} {status} after {seconds:.0f} s (whole log: {self.path(step)}):")
        for line in said[-FAILED_LINES:] or lines[-FAILED_LINES:]:
            self._say("    | " + line)

    def close(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = ""
        if self._step:  # kfp.local raises on a failed step instead of printing its end
            self._finished(self._step, "FAILED")
            self._step = None
        for f in self._files.values():
            f.close()
        self._files.clear()
        super().close()
