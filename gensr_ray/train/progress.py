"""The driver's one progress display of a training run.

The workers report to Ray Train's controller, which appends every report to the run's
metrics.jsonl (local mode: rank 0 itself); the driver follows that file from a thread while
`trainer.fit()` blocks: step / total, the loss parts, rows/s, ETA and the last validation.
On a terminal it is one bar redrawn in place; elsewhere (`ray job submit` logs, files) one
line per report, at most every `line_every` seconds.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from gensr_ray import storage

log = logging.getLogger(__name__)


def describe(row: dict, validation: tuple[str, float, int] | None) -> str:
    """One report as a line: loss parts, rows/s, the last validation metric."""
    parts = [f"loss {row['loss']:.4f}"] if "loss" in row else []
    inner = [f"{name.removeprefix('loss_')} {row[name]:.4f}"
             for name in ("loss_answer", "loss_listwise", "loss_contrastive") if name in row]
    if inner:
        parts[-1] += f" ({', '.join(inner)})"
    if "rows_per_s" in row:
        parts.append(f"{row['rows_per_s']:.0f} rows/s")
    if validation:
        name, value, step = validation
        parts.append(f"{name} {value:.4f} @{step}")
    return " | ".join(parts)


class TrainingProgress:
    """Context manager following `metrics_path` (local or a URI) while a run trains."""

    def __init__(self, metrics_path: str, total_steps: int | None, metric: str | None,
                 interval: float = 2.0, line_every: float = 30.0, stream=None,
                 quiet: bool = False):
        self.quiet = quiet  # show nothing (a Tune trial: Tune's own table reports it)
        self.path = metrics_path
        self.total = total_steps if total_steps and total_steps > 0 else None
        self.metric = metric
        self.interval = interval
        self.line_every = line_every
        self.stream = stream or sys.stderr
        self.seen = 0  # lines of the file already shown
        self.validation: tuple[str, float, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="training-progress",
                                        daemon=True)
        self._bar = None
        self._last_line = 0.0

    def __enter__(self):
        if self.quiet:
            return self
        self.seen = len(self._read())  # earlier attempts' lines belong to earlier runs
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, unit="step", desc="training", file=self.stream,
                             dynamic_ncols=True, mininterval=0.5)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.quiet:
            return
        self._stop.set()
        self._thread.join()
        self.poll()  # the last reports, written as the run ended
        if self._bar is not None:
            self._bar.close()

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - a display must never stop a run
                log.debug("progress display: %s", exc)

    def _read(self) -> list[str]:
        if not storage.exists(self.path):
            return []
        return [line for line in storage.read_text(self.path).splitlines() if line.strip()]

    def poll(self) -> list[dict]:
        """Show the reports written since the last poll; returns them."""
        import json

        lines = self._read()
        rows = [json.loads(line) for line in lines[self.seen:]]
        self.seen = len(lines)
        for row in rows:
            if self.metric and self.metric in row:
                self.validation = (self.metric, float(row[self.metric]), int(row["step"]))
        if rows:
            self._show(rows[-1])
        return rows

    def _show(self, row: dict) -> None:
        text = describe(row, self.validation)
        step = int(row.get("step", 0))
        if self._bar is not None:
            if self._bar.n == 0 and step:
                # the first report (a resumed run's comes at its old step): rate and ETA
                # count the steps from here on
                self._bar.reset(total=self.total)
                self._bar.initial = self._bar.n = self._bar.last_print_n = step
            else:
                self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(text, refresh=True)
            return
        now = time.monotonic()
        if now - self._last_line >= self.line_every or (self.total and step >= self.total):
            self._last_line = now
            total = f"/{self.total}" if self.total else ""
            print(f"step {step}{total} | {text}", file=self.stream, flush=True)
