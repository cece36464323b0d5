"""The per-worker training loop: build, restore, then forward -> loss -> backward -> step.

Runs inside every Ray Train worker (or in-process in local mode). Distribution is behind
`Strategy` (gensr_ray.train.strategy); everything here reads top to bottom.
"""

from __future__ import annotations

import time

from gensr_ray.assemble import build_model, preset_vocabulary, resolve_config_backbone
from gensr_ray.config import GenSRConfig
from gensr_ray.data.contract import local_root
from gensr_ray.inputs.build import build_features
from gensr_ray.model.gensr import gensr_loss
from gensr_ray.train.conflict import conflict_metrics, measure_batch, seeded_batches
from gensr_ray.train.dataset import epoch_batches
from gensr_ray.train.negatives import FreshNegatives
from gensr_ray.train.strategy import Strategy
from gensr_ray.train.validation import BestTracker, Validator


def train_loop_per_worker(config: dict) -> None:
    cfg: GenSRConfig = config["cfg"]
    strategy = Strategy(cfg, run_dir=config.get("run_dir"), tensorboard=config.get("tensorboard"),
                        loggers=config.get("loggers"))
    try:
        _train(cfg, strategy, config.get("data"))
    finally:
        strategy.close()


def _train(cfg: GenSRConfig, strategy: Strategy, data: dict | None) -> None:
    """The loop of one worker; `data`: the dataset's fingerprint, which every checkpoint
    records."""

    # this node's copy of the backbone (presets built, URIs mirrored, once per node)
    model, backbone = build_model(cfg, resolve_config_backbone(cfg))
    encoder, collate = build_features(cfg, backbone.tokenizer, backbone.kind)
    engine = strategy.prepare(model, preset_vocabulary(cfg, backbone.path))
    state = strategy.restore(data) or {"step": 0, "epoch": 0, "micro": 0}
    step, first_epoch, skip = state["step"], state["epoch"], state["micro"]
    resumed_from = step  # 0 for a fresh run; reported so restarts are visible in the metrics
    shard = strategy.dataset_shard("train")
    if 0 < cfg.train.max_steps <= step or first_epoch >= cfg.train.epochs or state.get("stopped"):
        # resumed a finished run: its last metrics again, nothing trained
        strategy.report({**state.get("metrics", {}), "step": step, "epoch": first_epoch})
        return
    validator = Validator(cfg, encoder, collate, backbone.kind, strategy.rank,
                          strategy.world_size, local_root(cfg.data.path)) \
        if cfg.train.eval_every else None
    tracker = BestTracker(cfg.train.best_metric, cfg.train.patience, state.get("best"))
    validated: dict = {}  # the latest validation's metrics, and its step
    # train.conflict_every: the gradient conflict on one fixed seeded batch, reported with
    # the next metrics
    per_task = cfg.train.conflict_examples - cfg.train.conflict_examples % strategy.world_size
    conflict_batch = seeded_batches(cfg.data.path, 1, max(per_task, strategy.world_size),
                                    cfg.train.seed)[0] if cfg.train.conflict_every else None
    conflict: dict = {}
    fresh = FreshNegatives(local_root(cfg.data.path), encoder, cfg.train.seed, strategy.rank,
                           cfg.train.negative_popularity) \
        if cfg.train.negatives == "fresh" else None

    def checkpoint(metrics: dict, epoch: int, micro: int) -> bool:
        """Validate (when validation is on), then report `metrics` with a checkpoint; True
        when patience ran out."""
        stop = False
        if validator is not None:
            if validated.get("step") != step:  # an epoch's end may fall on a validation step
                with strategy.evaluating():
                    validated.clear()
                    validated.update(validator.run(engine, strategy.to_device, strategy.sum),
                                     step=step)
                stop = tracker.update(validated, step)
            metrics.update({k: v for k, v in validated.items() if k != "step"})
            metrics.update({"best": tracker.best, "best_step": tracker.best_step,
                            "stopped_early": stop})
        strategy.report(metrics, {"step": step, "epoch": epoch, "micro": micro, "data": data,
                                  "best": tracker.state(), "stopped": stop, "metrics": metrics})
        return stop

    window: dict[str, float] = {}  # loss sums since the last report, per optimizer step
    window_steps, rows_seen, started, metrics = 0, 0, time.perf_counter(), {}
    clock = _InputClock()  # how much of each report window was spent waiting for rows
    for epoch in range(first_epoch, cfg.train.epochs):
        micro = 0
        for rows in clock.timed(epoch_batches(shard, cfg, epoch)):
            micro += 1
            if epoch == first_epoch and micro <= skip:
                continue  # resumed mid-epoch: these micro-batches were trained on already
            if fresh is not None:
                rows = fresh.redraw(rows, epoch, micro)
            batch = strategy.to_device(collate(rows))
            out = engine(batch)
            loss, parts = gensr_loss(out, batch["label"], cfg.loss, cfg.model, batch["example_id"])
            strategy.backward(loss)
            for key, value in parts.items():
                window[key] = window.get(key, 0.0) + float(value) / cfg.train.grad_accum
            rows_seen += len(rows["target"])
            if not strategy.step():
                continue

            step += 1
            window_steps += 1
            if _every(step, cfg.train.conflict_every):
                with strategy.evaluating() as evaluated:
                    conflict = conflict_metrics(measure_batch(cfg, strategy, evaluated, encoder,
                                                              collate, conflict_batch))
            log_now = step % cfg.train.log_every == 0
            save_now = (_every(step, cfg.train.checkpoint_every)
                        or _every(step, cfg.train.eval_every))
            last = step == cfg.train.max_steps
            if log_now or save_now or last:
                metrics = _metrics(strategy, window, window_steps, step, epoch, rows_seen, started)
                metrics["resumed_from"] = resumed_from
                metrics["input_wait_frac"] = clock.share()
                if fresh is not None:  # negatives no draw could replace (see FreshNegatives)
                    metrics["negatives_kept_stored"] = fresh.kept
                metrics.update(conflict)
                conflict = {}
                window.clear()
                window_steps = 0
                if save_now or last:
                    if checkpoint(metrics, epoch, micro):
                        return  # patience ran out
                else:
                    strategy.report(metrics)
            if last:
                return
        skip = 0
        if window_steps:
            metrics = _metrics(strategy, window, window_steps, step, epoch, rows_seen, started)
            metrics["resumed_from"] = resumed_from
            window.clear()
            window_steps = 0
        if checkpoint({**metrics, "epoch": epoch + 1}, epoch + 1, 0):
            return


def _every(step: int, period: int) -> bool:
    return period > 0 and step % period == 0


def _metrics(strategy: Strategy, window: dict, steps: int, step: int, epoch: int, rows: int,
             started: float) -> dict:
    """Window averages over optimizer steps and workers, plus progress and throughput."""
    averaged = strategy.mean({k: v / steps for k, v in window.items()})
    elapsed = time.perf_counter() - started
    return {**averaged, **strategy.memory(), "step": step, "epoch": epoch, "lr": strategy.lr(),
            "elapsed_s": elapsed,  # since this worker's loop started (after set-up)
            "rows_per_s": strategy.world_size * rows / elapsed if elapsed else 0.0}


class _InputClock:
    """Time spent waiting for the next batch, as a share of the wall time since the last
    report: near 1 means the input pipeline (reading, tokenizing) bounds training."""

    def __init__(self):
        self.waited, self.since = 0.0, time.perf_counter()

    def timed(self, batches):
        iterator = iter(batches)
        while True:
            t0 = time.perf_counter()
            rows = next(iterator, None)
            self.waited += time.perf_counter() - t0
            if rows is None:
                return
            yield rows

    def share(self) -> float:
        now = time.perf_counter()
        share = self.waited / (now - self.since) if now > self.since else 0.0
        self.waited, self.since = 0.0, now
        return share
