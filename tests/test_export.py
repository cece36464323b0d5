"""`gensr export`: peft adapters that PeftModel.from_pretrained loads, the GenSR modules as
safetensors, a model card; the export scores as the checkpoint does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gensr_ray.assemble import build_model, load_for_eval, resolve_config_backbone
from gensr_ray.checkpoint import write_model_export
from gensr_ray.cli import main
from gensr_ray.config import GenSRConfig, apply_overrides
from gensr_ray.data import contract
from gensr_ray.data.synthetic import SyntheticOptions, generate_synthetic
from gensr_ray.data.validate import fingerprint
from gensr_ray.data.writer import WriteOptions, write_dataset
from gensr_ray.eval.gensr_scorer import GenSRScorer
from gensr_ray.eval.harness import load_eval_examples
from gensr_ray.export import export_checkpoint, load_export


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from gensr_ray.cf.lightgcn import LightGCNConfig, save_cf, train_lightgcn

    def with_cf(tmp: Path) -> None:
        save_cf(train_lightgcn(tmp, LightGCNConfig(epochs=3)), contract.cf_path(tmp))

    out = tmp_path_factory.mktemp("export") / "data"
    write_dataset(generate_synthetic(SyntheticOptions(seed=4, n_users=30, n_items=120,
                                                      events_per_user=8)),
                  out, WriteOptions(rows_per_shard=100), after_build=with_cf)
    return out


def _checkpoint(data: Path, root: Path, subspace: str, popularity: bool = False
                ) -> tuple[Path, GenSRConfig]:
    """A checkpoint whose every trainable tensor is random, LoRA B included (zeros at
    initialisation), so that each adapter (and each popularity embedding) changes the scores."""
    cfg = apply_overrides(GenSRConfig(), {
        "data.path": str(data), "model.backbone": "preset:tiny-llama", "model.prompt": "minimal",
        "model.subspace": subspace, "model.lora_targets": ["q_proj", "v_proj"],
        "model.item_popularity": popularity})
    model, _ = build_model(cfg, resolve_config_backbone(cfg))
    generator = torch.Generator().manual_seed(0)
    weights = {n: p.detach() + 0.05 * torch.randn(p.shape, generator=generator)
               for n, p in model.named_parameters() if p.requires_grad}
    state = {"step": 7, "data": fingerprint(data), "metrics": {"val/mean/NDCG@10": 0.25}}
    write_model_export(root / "ckpt" / "model", weights, cfg, state)
    return root / "ckpt", cfg


def _scores(model, backbone, cfg, data: Path) -> dict[str, np.ndarray]:
    scorer = GenSRScorer(model, backbone, cfg, {}, depth=0, batch_size=64)
    scores = {}
    for task, batch in load_eval_examples(data, "test", max_examples=4).items():
        candidates = np.concatenate([batch["target"][:, None], batch["negatives"][:, :9]], 1)
        scores[task] = scorer.score(batch, candidates)
    return scores


@pytest.mark.parametrize(("subspace", "popularity"),
                         [("task_and_shared_lora", False), ("full", True)])
def test_the_export_scores_as_the_checkpoint(data, tmp_path, subspace, popularity, capsys):
    checkpoint, cfg = _checkpoint(data, tmp_path, subspace, popularity)
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert "exported to" in capsys.readouterr().out
    if subspace == "full":
        assert (out / "backbone" / "config.json").is_file() and not (out / "adapters").exists()
    else:
        assert sorted(p.name for p in (out / "adapters").iterdir()) == ["rec", "search", "shared"]
        for name in ("rec", "search", "shared"):
            config = json.loads((out / "adapters" / name / "adapter_config.json").read_text())
            assert config["peft_type"] == "LORA" and config["r"] == cfg.model.lora_r
            assert (out / "adapters" / name / "adapter_model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "step 7" in card and "| val/mean/NDCG@10 | 0.2500 |" in card
    expected = _scores(*load_for_eval(checkpoint), data)
    exported = _scores(*load_export(out), data)
    for task in ("search", "rec"):
        np.testing.assert_allclose(exported[task], expected[task], rtol=0, atol=1e-5)


def test_adapters_load_with_peft_alone_and_hold_the_trained_weights(data, tmp_path):
    from peft import PeftModel

    from gensr_ray.model.backbone import load_backbone

    checkpoint, _ = _checkpoint(data, tmp_path, "shared_lora")
    out = export_checkpoint(checkpoint, tmp_path / "export")
    base = load_backbone(out / "backbone").model
    lm = PeftModel.from_pretrained(base, str(out / "adapters" / "shared"), adapter_name="shared")
    loaded = {n: p for n, p in lm.named_parameters() if ".lora_" in n}
    trained, _, _ = load_for_eval(checkpoint)
    want = {n: p for n, p in trained.named_parameters() if ".lora_" in n}
    assert len(loaded) == len(want) > 0
    for name, value in want.items():
        key = "base_model.model." + name.removeprefix("lm.")
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


def test_an_export_never_overwrites_and_leaves_nothing_half_written(data, tmp_path, capsys):
    checkpoint, _ = _checkpoint(data, tmp_path, "shared_lora")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(taken)]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]
    missing = tmp_path / "nowhere"
    assert main(["export", "--checkpoint", str(missing), "--out", str(tmp_path / "e")]) == 2
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e.partial"))
