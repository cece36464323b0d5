"""Experiment tracking of a training run: every metric it reports, as TensorBoard scalars,
and with log.wandb / log.mlflow to Weights & Biases and MLflow.

The driver's metrics callback (a worker group) and the local-mode strategy (one process) both
log through `Tracker`, so `tensorboard --logdir <out>/tensorboard` shows any run alike.
`RunLoggers` opens W&B and MLflow runs with Ray's integrations (ray.air.integrations) on the
rank-0 worker, which logs every report to them.
"""

from __future__ import annotations

import numbers
import os


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


def _numeric(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if not isinstance(value, list) else str(value)
    return out


class RunLoggers:
    """The W&B and MLflow runs of one training run (rank 0 only), opened with Ray's
    setup_wandb / setup_mlflow with the resolved config as their parameters."""

    def __init__(self, log_cfg, config: dict, name: str, wandb_dir: str | None = None,
                 mlflow_uri: str | None = None):
        self._wandb = self._mlflow = None
        params = _flat(config)
        if log_cfg.wandb:
            from ray.air.integrations.wandb import setup_wandb

            if wandb_dir:
                os.makedirs(wandb_dir, exist_ok=True)
            # rank_zero_only=False: only rank 0 builds RunLoggers (Ray Train v2 workers have
            # no v1 session for setup_wandb to read the rank from)
            self._wandb = setup_wandb(config=params, project=log_cfg.project, name=name,
                                      dir=wandb_dir, rank_zero_only=False)
        if log_cfg.mlflow:
            from ray.air.integrations.mlflow import setup_mlflow

            if (mlflow_uri or "").startswith("file:"):
                # MLflow 3 refuses its file store unless asked for: a local store is the
                # default here, a tracking server or database the choice for teams
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

            self._mlflow = setup_mlflow(
                config=params, tracking_uri=mlflow_uri or None,
                experiment_name=log_cfg.project, run_name=name,
                create_experiment_if_not_exists=True, rank_zero_only=False)

    def log(self, metrics: dict) -> None:
        if "step" not in metrics or not (self._wandb or self._mlflow):
            return
        step, values = int(metrics["step"]), _numeric(metrics)
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        if self._mlflow is not None:
            # MLflow names take letters, digits and _-. :/ only
            self._mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in values.items()},
                                     step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._mlflow is not None:
            self._mlflow.end_run()
            self._mlflow = None
