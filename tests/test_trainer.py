"""GenSR on Ray Train + DeepSpeed ZeRO-3 (CPU accelerator, gloo), end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gensr_ray.assemble import build_model, load_for_eval, resolve_config_backbone
from gensr_ray.checkpoint import model_dir, read_vocabulary
from gensr_ray.config import GenSRConfig, apply_overrides
from gensr_ray.data import contract
from gensr_ray.data.synthetic import SyntheticOptions, generate_synthetic
from gensr_ray.data.writer import RawDataset, WriteOptions, write_dataset
from gensr_ray.inputs.build import build_features, vocabulary_texts
from gensr_ray.model.backbone import preset_words
from gensr_ray.model.losses import answer_score
from gensr_ray.train.launch import run_location, run_training


def _with_cf(tmp: Path) -> None:
    from gensr_ray.cf.lightgcn import LightGCNConfig, save_cf, train_lightgcn

    save_cf(train_lightgcn(tmp, LightGCNConfig(epochs=20)), contract.cf_path(tmp))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trainer") / "synthetic"
    write_dataset(generate_synthetic(SyntheticOptions(seed=0, n_users=60, n_items=140, events_per_user=14)), out,
                  WriteOptions(rows_per_shard=200), after_build=_with_cf)
    return out


def _config(data: Path, **overrides) -> GenSRConfig:
    base = {
        "data.path": str(data), "model.backbone": "preset:tiny-llama", "model.prompt": "minimal",
        "model.lora_r": 4, "train.batch_size": 20, "train.lr": 3e-3, "train.warmup_steps": 2,
        "train.log_every": 2, "scale.num_workers": 2, "scale.cpus_per_worker": 0.5,
    }
    return apply_overrides(GenSRConfig(), {**base, **overrides})


def _probe_scores(model, backbone, cfg, n: int = 6) -> torch.Tensor:
    encoder, collate = build_features(cfg, backbone.tokenizer, backbone.kind)
    examples = contract.read_table(contract.examples_dir(cfg.data.path, "test")).slice(0, n)
    rows = encoder.encode(examples.to_pydict(), negatives_per_example=4)
    with torch.no_grad():
        return answer_score(model.eval()(collate(rows))["logits"])


def test_two_worker_zero3_run_learns_saves_loads_and_resumes(ray_cluster, synthetic, tmp_path,
                                                             monkeypatch):
    cfg = _config(synthetic, **{"train.max_steps": 16, "train.checkpoint_every": 8,
                                "train.conflict_every": 8, "train.conflict_examples": 4})
    out = tmp_path / "run"
    summary = run_training(cfg, out)
    ckpt = Path(summary["checkpoint"])
    progress = _progress(out, cfg)
    # the gradient conflict, measured every 8 steps, rides with the next report
    measured = [m for m in progress if "conflict/overall" in m]
    assert [m["step"] for m in measured] == [8, 16]
    assert all(-1.0 <= m["conflict/overall"] <= 1.0 and "conflict/lora_B" in m
               for m in measured)
    losses = [m["loss_answer"] for m in progress]
    assert losses[-1] < losses[0], losses  # the synthetic set is learnable
    assert summary["metrics"]["step"] == 16
    # the first window waits for the dataset's first blocks; the share is a fraction
    waits = [m["input_wait_frac"] for m in progress]
    assert all(0.0 <= w <= 1.0 for w in waits) and waits[0] > 0.0, waits

    # every trainable parameter moved away from its (seeded) initial value, adapters non-empty
    initial, _ = build_model(cfg, resolve_config_backbone(cfg))
    saved = torch.load(model_dir(ckpt) / "trainable.pt", weights_only=True)
    before = {n: p for n, p in initial.named_parameters() if p.requires_grad}
    assert set(saved) == set(before)
    assert any("lora_B" in n for n in saved)
    for name, tensor in saved.items():
        assert tensor.shape == before[name].shape and tensor.numel() > 0, name
        assert not torch.equal(tensor, before[name].detach()), f"{name} did not change"

    # the exported model scores exactly as the DeepSpeed state that training saved
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model, backbone, _ = load_for_eval(ckpt)
    full_state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "deepspeed"), tag="state")
    reference, _ = build_model(cfg, resolve_config_backbone(cfg))
    reference.load_state_dict(full_state, strict=False)
    torch.testing.assert_close(_probe_scores(model, backbone, cfg),
                               _probe_scores(reference, backbone, cfg), rtol=0, atol=1e-5)
    state = json.loads((model_dir(ckpt) / "state.json").read_text())
    assert state["step"] == 16

    # the tiny preset's frozen weights are drawn from its vocabulary, which the checkpoint
    # records: after an edit that adds a word to the templates (or the data), evaluation
    # still rebuilds the backbone the run trained on; without the record, the LoRA weights
    # would load onto other random weights, without an error
    words = read_vocabulary(ckpt)
    assert words == preset_words(resolve_config_backbone(cfg))
    scores = _probe_scores(model, backbone, cfg)
    texts = vocabulary_texts(cfg.data.path)
    monkeypatch.setattr("gensr_ray.assemble.vocabulary_texts", lambda *_: texts + ["zyzzyva"])
    assert len(preset_words(resolve_config_backbone(cfg))) == len(words) + 1
    rebuilt, rebuilt_backbone, _ = load_for_eval(ckpt)
    torch.testing.assert_close(_probe_scores(rebuilt, rebuilt_backbone, cfg), scores,
                               rtol=0, atol=0)
    unrecorded = tmp_path / "unrecorded"  # a checkpoint without the record
    shutil.copytree(ckpt, unrecorded)
    (model_dir(unrecorded) / "vocabulary.json").unlink()
    redrawn, redrawn_backbone, _ = load_for_eval(unrecorded)
    assert not torch.allclose(_probe_scores(redrawn, redrawn_backbone, cfg), scores)
    monkeypatch.undo()

    # same --out again with a higher step budget: resumes from step 16, does not restart
    resumed = run_training(apply_overrides(cfg, {"train.max_steps": 20}), out)
    assert resumed["metrics"]["step"] == 20
    steps = [m["step"] for m in _progress(out, cfg)]
    assert steps[len(progress):] and min(steps[len(progress):]) > 16, steps


def _progress(out: Path, cfg: GenSRConfig) -> list[dict]:
    """Every metrics row Ray Train reported for the run, in order (metrics.jsonl)."""
    path = Path(run_location(cfg, out).metrics)
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def four_examples(tmp_path_factory) -> Path:
    """Exactly 4 training examples (20 pointwise rows): one optimizer step per epoch."""
    n_items = 120
    users, items, stamps = [], [], []
    for u in range(4):
        for e in range(4):  # events 1-2 train (1 example), 3 valid, 4 test
            users.append(f"u{u}")
            items.append(f"i{(7 * u + 3 * e) % n_items}")
            stamps.append(100 * u + e)
    raw = RawDataset(
        source="equivalence fixture", items_file="<items>", interactions_file="<events>",
        item_ids=[f"i{i}" for i in range(n_items)], titles=[f"item {i}" for i in range(n_items)],
        texts=[f"item {i}" for i in range(n_items)], user_ids=users, inter_item_ids=items,
        tasks=["rec"] * len(users), queries=[None] * len(users), timestamps=stamps)
    out = tmp_path_factory.mktemp("equivalence") / "data"
    write_dataset(raw, out, after_build=_with_cf)
    assert contract.read_meta(out)["counts"]["examples"]["train"]["rec"] == 4
    return out


def test_one_worker_with_accumulation_matches_two_workers(ray_cluster, four_examples, tmp_path):
    # The contrastive term uses the other rows of a micro-batch as negatives, so it depends on
    # how rows are grouped; the answer loss alone must not.
    common = {"train.batch_size": 10, "train.epochs": 3, "train.lr": 1e-3,
              "train.warmup_steps": 1, "loss.contrastive_weight": 0.0, "data.shuffle_seed": -1}
    weights = []
    # one process (local mode: no worker group to start) accumulating two micro-batches
    # against two ZeRO-3 workers of one micro-batch each
    for workers, accum in ((0, 2), (2, 1)):
        cfg = _config(four_examples, **common, **{"scale.num_workers": workers,
                                                  "train.grad_accum": accum})
        summary = run_training(cfg, tmp_path / f"w{workers}")
        assert summary["metrics"]["step"] == 3
        weights.append(torch.load(model_dir(summary["checkpoint"]) / "trainable.pt",
                                  weights_only=True))
    initial, _ = build_model(cfg, resolve_config_backbone(cfg))
    moved = 0
    for name, p in initial.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-4, atol=1e-6)
            moved += not torch.equal(weights[0][name], p.detach())
    assert moved > 0
