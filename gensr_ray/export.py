"""A checkpoint as files other tools read: peft adapters, safetensors, a model card.

    <out>/adapters/<name>/adapter_config.json       one peft LoRA adapter per subspace adapter
    <out>/adapters/<name>/adapter_model.safetensors (shared | search | rec), loadable with
                                                    peft's PeftModel.from_pretrained
    <out>/backbone/                 save_pretrained backbone + tokenizer: the fine-tuned model
                                    (model.subspace=full) or a random preset's base weights
                                    (not rebuildable elsewhere); absent when the adapters'
                                    base is a named backbone (base_model_name_or_path)
    <out>/gensr_modules.safetensors the GenSR modules (view encoders, target attention,
                                    projection) and the frozen LightGCN item table
    <out>/config.yaml               the run's resolved config
    <out>/README.md                 model card: config, data, metrics, how to load it

`load_export(out)` rebuilds the scoring model from these files alone (plus a named backbone),
through PeftModel.from_pretrained; it scores as the checkpoint does.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import yaml

from gensr_ray.assemble import is_random_preset, load_for_eval, resolve_config_backbone
from gensr_ray.checkpoint import model_dir, read_checkpoint_config, resolve_checkpoint
from gensr_ray.config import GenSRConfig, from_dict, read_yaml
from gensr_ray.model.backbone import load_backbone
from gensr_ray.model.gensr import SUBSPACES, GenSR, route_default

MODULES = "gensr_modules.safetensors"
CF_TABLE = "cf_items"  # the frozen LightGCN item table's key in MODULES
ITEM_COUNTS = "item_counts"  # model.item_popularity: the train counts its buckets come from


def export_checkpoint(checkpoint: str | Path, out: Path, which: str = "best") -> Path:
    """Write `checkpoint` (a checkpoint or a `gensr train --out` run) into `out`, which must
    not exist or be empty; written into a sibling temporary directory and renamed, so an
    interrupted export leaves nothing behind."""
    from safetensors.torch import save_file

    # the export runs on the CPU: DeepSpeed (imported by the libraries) need not probe for a
    # GPU and warn that it found none
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty directory")
    path = resolve_checkpoint(checkpoint, which)
    cfg = read_checkpoint_config(path)
    model, backbone, cfg = load_for_eval(path, cfg)
    adapters = SUBSPACES[cfg.model.subspace][0]
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        lm_weights = {n.removeprefix("lm."): p.detach() for n, p in model.named_parameters()
                      if p.requires_grad and n.startswith("lm.")}
        for name in adapters:
            _write_adapter(tmp / "adapters" / name, name, lm_weights, cfg)
        if not adapters:  # full fine-tuning: the backbone itself is the trained model
            model.lm.save_pretrained(tmp / "backbone", safe_serialization=True)
            backbone.tokenizer.save_pretrained(tmp / "backbone")
        elif is_random_preset(cfg):
            shutil.copytree(backbone.path, tmp / "backbone")
        modules = {n: p.detach().contiguous() for n, p in model.named_parameters()
                   if p.requires_grad and not n.startswith("lm.")}
        modules[CF_TABLE] = model.cf_items.contiguous()
        if cfg.model.item_popularity:
            modules[ITEM_COUNTS] = model.item_counts.contiguous()
        save_file(modules, str(tmp / MODULES), metadata={"format": "pt"})
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        state = json.loads((model_dir(path) / "state.json").read_text())
        (tmp / "README.md").write_text(model_card(cfg, state, path, adapters))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_adapter(directory: Path, name: str, lm_weights: dict, cfg: GenSRConfig) -> None:
    """peft's save_pretrained layout: keys as PeftModel names them, the adapter name left
    out (peft puts it back at load time)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    marker = f".{name}."
    tensors = {"base_model.model." + key.replace(marker, "."): w.contiguous()
               for key, w in lm_weights.items() if marker in key and ".lora_" in key}
    if not tensors:
        raise ValueError(f"adapter {name!r}: no LoRA weights in the checkpoint")
    m = cfg.model
    config = LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                        target_modules=list(m.lora_targets),
                        base_model_name_or_path="backbone" if is_random_preset(cfg)
                        else m.backbone)
    directory.mkdir(parents=True)
    config.save_pretrained(str(directory))
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})


def load_export(directory: str | Path) -> tuple[GenSR, object, GenSRConfig]:
    """(GenSR in eval mode, backbone, config) from an export: the backbone, then the peft
    adapters with PeftModel.from_pretrained, then the GenSR modules."""
    from peft import PeftModel
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = from_dict(read_yaml(directory / "config.yaml"))
    base = directory / "backbone"
    backbone = load_backbone(base if base.is_dir() else resolve_config_backbone(cfg),
                             cfg.model.attn_implementation)
    adapters = SUBSPACES[cfg.model.subspace][0]
    lm = backbone.model
    if adapters:
        first, *others = adapters
        peft_model = PeftModel.from_pretrained(lm, str(directory / "adapters" / first),
                                               adapter_name=first)
        for name in others:
            with warnings.catch_warnings():  # more adapters on one model is the intent here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                peft_model.load_adapter(str(directory / "adapters" / name), adapter_name=name)
        lm = peft_model.base_model.model
        route_default(lm, cfg.model)
    modules = load_file(str(directory / MODULES))
    cf_items = modules.pop(CF_TABLE)
    model = GenSR(lm, backbone.kind, cf_items, cfg.model, backbone.yes_id, backbone.no_id,
                  item_counts=modules.pop(ITEM_COUNTS, None))
    missing, unexpected = model.load_state_dict(modules, strict=False)
    missing = [n for n in missing if not n.startswith("lm.")]
    if missing or unexpected:
        raise ValueError(f"{directory / MODULES}: does not match the model of its config "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval(), backbone, cfg


def model_card(cfg: GenSRConfig, state: dict, checkpoint: str, adapters: list[str]) -> str:
    metrics = state.get("metrics", {})
    shown = {k: v for k, v in metrics.items() if k.startswith(("val/", "loss"))}
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(shown.items())
                     if isinstance(v, (int, float))) or "| (none recorded) | |"
    base = ("`backbone/` (the fine-tuned model)" if not adapters else
            "`backbone/` (random preset weights)" if is_random_preset(cfg) else
            f"`{cfg.model.backbone}`")
    data = state.get("data") or {}
    return f"""---
library_name: {"peft" if adapters else "transformers"}
tags: [gensr, recommendation, search]
---
# GenSR model export

One language model answering search and recommendation questions (GenSR), exported from
`{checkpoint}` at step {state.get("step", "?")}.

- backbone: {base}; prompt `{cfg.model.prompt}`; subspace `{cfg.model.subspace}`
  ({", ".join(f"adapter `{a}`" for a in adapters) or "full fine-tuning"})
- data: `{cfg.data.path}` (fingerprint: dataset `{data.get("dataset", "?")}`, LightGCN
  table `{data.get("cf", "?")}`)
- training: {cfg.train.max_steps} steps max, batch {cfg.train.batch_size} per worker,
  lr {cfg.train.lr} ({cfg.train.lr_schedule}), seed {cfg.train.seed}

## Metrics at export (validation subset, sampled protocol)

| metric | value |
|---|---|
{rows}

## Loading it

```python
from gensr_ray.export import load_export

model, backbone, cfg = load_export("path/to/this/directory")  # GenSR, eval mode
```

The adapters alone are peft's format:

```python
from peft import PeftModel
lm = PeftModel.from_pretrained(base_model, "adapters/<name>", adapter_name="<name>")
```

`gensr_modules.safetensors` holds the GenSR modules (history encoders, target attention,
projection) and the LightGCN item table (`{CF_TABLE}`); `config.yaml` the full config.
"""
