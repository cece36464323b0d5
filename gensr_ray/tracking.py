"""Experiment tracking of a training run: every metric it reports, as TensorBoard scalars.

The driver's metrics callback (a worker group) and the local-mode strategy (one process) both
log through `Tracker`, so `tensorboard --logdir <out>/tensorboard` shows any run alike.
"""

from __future__ import annotations

import numbers


class Tracker:
    """TensorBoard scalars of each report, at its optimizer step; nothing without a directory."""

    def __init__(self, logdir: str | None):
        self.logdir = logdir
        self._writer = None

    def log(self, metrics: dict) -> None:
        if not self.logdir or "step" not in metrics:
            return
        if self._writer is None:
            # torch's writer (tensorboard's event file writer): its flush() waits until the
            # queued events are on disk, so a report is visible as soon as it is logged
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.logdir)
        step = int(metrics["step"])
        for key, value in metrics.items():
            if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self._writer.add_scalar(key, float(value), step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
