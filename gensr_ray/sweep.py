"""The sweep file of a Ray Tune study (configs/sweeps/*.yaml): what it may say, checked before
anything runs.

    metric: mean/sampled/NDCG@10     # task/protocol/metric on the validation split, or mean/...
    mode: max
    seeds: [1, 2, 3]                 # optional: every trial runs once per seed (train.seed)
    reference: authors               # optional: what the others are compared with (default: the
                                     # first trial)
    scheduler:                       # optional: stop poor trials early (needs train.eval_every)
      name: asha
      grace_period: 200              # optimizer steps every trial runs before it may be stopped
      reduction_factor: 2
    trials:
      authors: {model.prompt: authors}
      minimal: {model.prompt: minimal}
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from gensr_ray.config import (
    VALIDATION_METRICS,
    ConfigError,
    GenSRConfig,
    apply_overrides,
    read_yaml_mapping,
)

KEYS = ("metric", "mode", "seeds", "reference", "scheduler", "trials")


@dataclass
class Sweep:
    name: str
    metric: str
    mode: str
    trials: dict[str, dict]
    scheduler: dict = field(default_factory=dict)  # {} or {"name": "asha", ...}
    seeds: list[int] = field(default_factory=list)  # [] : each trial once, its config's seed
    reference: str = ""  # the trial the others are compared with

    def __post_init__(self):
        self.reference = self.reference or next(iter(self.trials))

    @property
    def validation_metric(self) -> str:
        """What validation during training reports for `metric` (sampled protocol)."""
        task, protocol, name = self.metric.split("/")
        return f"val/{task}/{name}" if protocol == "sampled" else ""


SCHEDULERS = {"asha": {"grace_period": 1, "reduction_factor": 2}}  # settings: their minimum


def _scheduler(path: Path, data) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict) or data.get("name") not in SCHEDULERS:
        raise ConfigError(f"{path}: scheduler must be a mapping with name: one of "
                          f"{sorted(SCHEDULERS)}")
    limits = SCHEDULERS[data["name"]]
    unknown = set(data) - {"name", *limits}
    if unknown:
        raise ConfigError(f"{path}: scheduler: unknown key(s) {sorted(unknown)}; known: name, "
                          + ", ".join(limits))
    for key, least in limits.items():
        value = data.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < least):
            raise ConfigError(f"{path}: scheduler.{key}={value!r}: expected an integer >= "
                              f"{least}")
    return dict(data)


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    data = read_yaml_mapping(path, "sweep")
    unknown = set(data) - set(KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; known: {', '.join(KEYS)}")
    trials = data.get("trials") or {}
    if not isinstance(trials, dict) or not trials:
        raise ConfigError(f"{path}: `trials` must map trial names to override mappings")
    if data.get("mode", "max") not in ("max", "min"):
        raise ConfigError(f"{path}: mode must be max or min")
    metric = data.get("metric", "mean/sampled/NDCG@10")
    if not isinstance(metric, str) or len(metric.split("/")) != 3:
        raise ConfigError(f"{path}: metric {metric!r} must look like task/protocol/metric")
    for name, overrides in trials.items():
        if not isinstance(overrides or {}, dict):
            raise ConfigError(f"{path}: trial {name!r}: expected a mapping of overrides, got "
                              f"{overrides!r}")
        try:
            apply_overrides(GenSRConfig(), dict(overrides or {}))
        except ConfigError as exc:
            raise ConfigError(f"{path}: trial {name!r}: {exc}") from None
    seeds = data.get("seeds") or []
    if not isinstance(seeds, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: seeds must be a list of distinct integers, got {seeds!r}")
    reference = data.get("reference") or ""
    if reference and reference not in trials:
        raise ConfigError(f"{path}: reference {reference!r} is not a trial; trials: "
                          f"{', '.join(map(str, trials))}")
    sweep = Sweep(path.stem, metric, data.get("mode", "max"),
                  {str(k): dict(v or {}) for k, v in trials.items()},
                  _scheduler(path, data.get("scheduler")), list(seeds), str(reference))
    if sweep.scheduler and sweep.validation_metric not in VALIDATION_METRICS:
        raise ConfigError(f"{path}: a scheduler compares trials by validation during training, "
                          f"which reports {', '.join(VALIDATION_METRICS)}; metric "
                          f"{metric!r} has no such counterpart")
    return sweep


def select(sweep: Sweep, trials: list[str] | None = None, seeds: list[int] | None = None
           ) -> Sweep:
    """Part of a study: some of its trials (the reference among them, since every other trial
    is compared with it) and/or other seeds. None keeps the sweep file's."""
    if trials:
        unknown = [t for t in trials if t not in sweep.trials]
        if unknown:
            raise ConfigError(f"--trials {' '.join(unknown)}: not in sweep {sweep.name!r}; its "
                              f"trials: {', '.join(sweep.trials)}")
        if sweep.reference not in trials:
            raise ConfigError(f"--trials must include the reference trial {sweep.reference!r}: "
                              "every other trial is compared with it")
        sweep = replace(sweep, trials={t: sweep.trials[t] for t in sweep.trials if t in trials})
    if seeds:
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"--seeds {' '.join(map(str, seeds))}: seeds must be distinct")
        sweep = replace(sweep, seeds=list(seeds))
    return sweep
