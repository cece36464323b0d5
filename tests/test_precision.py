"""The model under DeepSpeed ZeRO-3 in bf16 / fp16 (CPU accelerator, gloo, one process),
train and eval modes, gradient checkpointing and the attention implementation.

The strategy runs here outside Ray Train (`SingleProcessContext`): what is under test is the
DeepSpeed path itself; tests/test_trainer.py runs the same strategy through Ray Train.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from torch.overrides import TorchFunctionMode

from gensr_ray.assemble import build_model, resolve_config_backbone
from gensr_ray.config import ConfigError, GenSRConfig, apply_overrides
from gensr_ray.data import contract
from gensr_ray.inputs.build import build_features
from gensr_ray.model.gensr import gensr_loss

TARGETS = {"tiny-llama": ["q_proj", "v_proj"], "tiny-t5": ["q", "v"]}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@pytest.fixture(scope="module")
def data(tmp_path_factory, model_cache):
    from gensr_ray.cf.lightgcn import LightGCNConfig, save_cf, train_lightgcn
    from gensr_ray.data.synthetic import SyntheticOptions, generate_synthetic
    from gensr_ray.data.writer import write_dataset

    def with_cf(tmp):
        save_cf(train_lightgcn(tmp, LightGCNConfig(epochs=2)), contract.cf_path(tmp))

    out = tmp_path_factory.mktemp("precision") / "data"
    write_dataset(generate_synthetic(SyntheticOptions(seed=2, n_users=20, n_items=130,
                                                      events_per_user=8)),
                  out, after_build=with_cf)
    return out


@pytest.fixture(scope="module", autouse=True)
def process_group():
    """One gloo process group of size 1 for the module (the strategy makes it)."""
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _config(data, backbone="tiny-llama", **overrides) -> GenSRConfig:
    return apply_overrides(GenSRConfig(), {
        "data.path": str(data), "model.backbone": f"preset:{backbone}",
        "model.lora_targets": TARGETS[backbone], "model.prompt": "minimal",
        "train.batch_size": 20, "train.lr": 3e-3, "train.warmup_steps": 1,
        "scale.num_workers": 1, **overrides})


def _batch(cfg, backbone, rows: int = 4):
    encoder, collate = build_features(cfg, backbone.tokenizer, backbone.kind)
    examples = contract.read_table(contract.examples_dir(cfg.data.path, "train")).slice(0, rows)
    return collate(encoder.encode(examples.to_pydict(), negatives_per_example=4))


def _engine(cfg):
    from gensr_ray.train.strategy import SingleProcessContext, Strategy

    model, backbone = build_model(cfg, resolve_config_backbone(cfg))
    strategy = Strategy(cfg, SingleProcessContext())
    engine = strategy.prepare(model)
    return strategy, engine, backbone


def _train(cfg, strategy, engine, batch, steps: int) -> tuple[list[float], dict]:
    """`steps` optimizer steps on one batch; the losses and the last forward's output."""
    losses = []
    for _ in range(steps):
        out = engine(batch)
        loss, _ = gensr_loss(out, batch["label"], cfg.loss, cfg.model)
        strategy.backward(loss)
        strategy.step()
        losses.append(loss.item())
    return losses, out


class MatmulDtypes(TorchFunctionMode):
    """Records the floating dtypes entering every matrix product on the autograd path.

    Products are matched by name: under ZeRO-3 DeepSpeed swaps F.linear for its own function
    (a matmul of the gathered weight). Products of constants only (no operand requires grad
    or has a history, e.g. Llama's rotary inv_freq x positions, fp32 by design) are left out.
    """

    PRODUCTS = {"linear", "matmul", "__matmul__", "mm", "bmm", "addmm", "baddbmm", "einsum",
                "scaled_dot_product_attention"}

    def __init__(self):
        super().__init__()
        self.dtypes: set[torch.dtype] = set()
        self.mixed: list[str] = []
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in self.PRODUCTS:
            flat = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            flat += [t for a in args if isinstance(a, (list, tuple)) for t in a
                     if isinstance(t, torch.Tensor)]
            floats = [t for t in flat if t.is_floating_point()]
            if any(t.requires_grad or t.grad_fn is not None for t in floats):
                self.calls += 1
                dtypes = {t.dtype for t in floats}
                self.dtypes |= dtypes
                if len(dtypes) > 1:
                    self.mixed.append(f"{name}: {sorted(map(str, dtypes))}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("backbone", ["tiny-llama", "tiny-t5"])
@pytest.mark.parametrize("subspace", ["shared_lora", "task_lora", "task_and_shared_lora",
                                      "full"])
def test_bf16_zero3_trains_every_backbone_and_subspace(data, backbone, subspace):
    # full fine-tuning at the adapters' lr (3e-3) oscillates on tiny-t5 (8 losses
    # 0.575 ... 1.232, 0.498, 0.711, 0.345, 0.873); 3e-4 descends steadily, as full runs would
    lr = 3e-4 if subspace == "full" else 3e-3
    cfg = _config(data, backbone, **{"scale.precision": "bf16", "model.subspace": subspace,
                                     "train.lr": lr})
    strategy, engine, backbone_ = _engine(cfg)
    batch = _batch(cfg, backbone_)
    assert set(batch["task"].tolist()) == {0, 1}
    losses = []
    for step in range(8):
        if step == 0:
            with MatmulDtypes() as probe:
                out = engine(batch)
        else:
            out = engine(batch)
        loss, _ = gensr_loss(out, batch["label"], cfg.loss, cfg.model)
        strategy.backward(loss)
        strategy.step()
        losses.append(loss.item())
    assert probe.calls > 10 and probe.mixed == [], probe.mixed
    assert probe.dtypes == {torch.bfloat16}
    assert out["logits"].dtype == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses


def test_bf16_export_is_the_fp32_master_copy(data, tmp_path):
    """Exported weights equal DeepSpeed's own zero_to_fp32 consolidation, not the bf16
    working copy the module computes with."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from gensr_ray.train.strategy import CHECKPOINT_MODEL, CHECKPOINT_STATE, TAG

    cfg = _config(data, **{"scale.precision": "bf16", "train.lr": 1e-3})
    strategy, engine, backbone = _engine(cfg)
    batch = _batch(cfg, backbone)
    _train(cfg, strategy, engine, batch, 3)
    strategy.save(tmp_path, {"step": 3, "epoch": 0, "micro": 3})
    exported = torch.load(tmp_path / CHECKPOINT_MODEL / "trainable.pt", weights_only=True)
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / CHECKPOINT_STATE),
                                                            tag=TAG)
    assert exported and set(exported) <= set(consolidated)
    not_bf16 = 0
    for name, tensor in exported.items():
        assert tensor.dtype == torch.float32, name
        torch.testing.assert_close(tensor, consolidated[name].float(), rtol=0, atol=0)
        not_bf16 += bool((tensor != tensor.to(torch.bfloat16).float()).any())
    assert not_bf16 > 0  # fp32 values a bf16 copy could not hold


def test_fp16_trains_a_decoder_where_supported_and_is_refused_for_t5(data):
    """fp16 trains where DeepSpeed's accelerator has fp16 kernels (on CPUs, oneDNN's need
    AVX512-FP16 or AMX); elsewhere the setting is refused by name before the engine starts,
    where DeepSpeed's own refusal names neither the setting nor a way out."""
    from deepspeed.accelerator import get_accelerator

    cfg = _config(data, **{"scale.precision": "fp16"})
    if get_accelerator().is_fp16_supported():
        strategy, engine, backbone = _engine(cfg)
        batch = _batch(cfg, backbone)
        # dynamic loss scaling may skip the first steps on overflow
        losses, out = _train(cfg, strategy, engine, batch, 10)
        assert out["logits"].dtype == torch.float16
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    else:
        with pytest.raises(ConfigError, match="scale.precision=fp16: DeepSpeed's cpu "
                                              "accelerator .* use scale.precision=bf16"):
            _engine(cfg)
    t5 = _config(data, "tiny-t5", **{"scale.precision": "fp16"})
    with pytest.raises(ConfigError, match="scale.precision=fp16 is not supported"):
        build_model(t5, resolve_config_backbone(t5))


def test_cosine_schedule_warms_up_then_decays_to_zero_at_max_steps(data):
    cfg = _config(data, **{"train.lr_schedule": "cosine", "train.lr": 1e-3,
                           "train.warmup_steps": 2, "train.max_steps": 6})
    strategy, engine, backbone = _engine(cfg)
    batch = _batch(cfg, backbone)
    lrs = []
    for _ in range(7):
        _train(cfg, strategy, engine, batch, 1)
        lrs.append(strategy.lr())
    # DeepSpeed's schedule at iteration k (reported after k + 1 steps): linear from 0 over
    # the 2 warm-up iterations, then half a cosine over the 4 left, 0 at the last
    expected = [0.0, 5e-4, *(5e-4 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3, 4))]
    assert lrs[:6] == pytest.approx(expected, abs=1e-9), lrs
    assert lrs[6] == 0.0  # past max_steps it stays at the floor
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5]
    with pytest.raises(ConfigError, match="train.lr_schedule=cosine decays over train.max_steps"):
        _config(data, **{"train.lr_schedule": "cosine"})


def test_dropout_is_active_in_training_and_off_in_scoring(data, tmp_path):
    """A T5 configured with dropout 0.1, as flan-t5 is: the strategy trains it in train
    mode; evaluation (load_for_eval, the scorer) puts it in eval mode."""
    cfg = _config(data, "tiny-t5")
    source = resolve_config_backbone(cfg)
    backbone_dir = tmp_path / "t5-dropout"
    shutil.copytree(source, backbone_dir)
    config = json.loads((backbone_dir / "config.json").read_text())
    (backbone_dir / "config.json").write_text(json.dumps({**config, "dropout_rate": 0.1}))
    cfg = apply_overrides(cfg, {"model.backbone": str(backbone_dir)})
    strategy, engine, backbone = _engine(cfg)
    batch = _batch(cfg, backbone)
    dropouts = [m for m in engine.module.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.1 and m.training for m in dropouts)
    with torch.no_grad():
        first, second = engine(batch)["logits"], engine(batch)["logits"]
    assert not torch.equal(first, second)  # dropout draws differ between passes
    engine.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(engine(batch)["logits"], engine(batch)["logits"],
                                   rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients(data):
    grads = []
    for checkpointing in (False, True):
        cfg = _config(data, **{"model.gradient_checkpointing": checkpointing,
                               "model.subspace": "task_and_shared_lora"})
        model, backbone = build_model(cfg, resolve_config_backbone(cfg))
        assert model.lm.is_gradient_checkpointing == checkpointing
        for p in model.parameters():  # non-zero LoRA B, so every adapter gets gradients
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(0))
        model.train()
        loss, _ = gensr_loss(model(_batch(cfg, backbone)), _batch(cfg, backbone)["label"],
                             cfg.loss, cfg.model)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.requires_grad and p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_trains_under_zero3(data):
    cfg = _config(data, **{"model.gradient_checkpointing": True, "scale.precision": "bf16"})
    strategy, engine, backbone = _engine(cfg)
    losses, _ = _train(cfg, strategy, engine, _batch(cfg, backbone), 6)
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("backbone", ["tiny-llama", "tiny-t5"])
def test_sdpa_is_the_default_and_scores_as_eager_attention(data, backbone):
    scores = {}
    for impl in ("sdpa", "eager"):
        cfg = _config(data, backbone, **{"model.attn_implementation": impl})
        model, backbone_ = build_model(cfg, resolve_config_backbone(cfg))
        assert model.lm.config._attn_implementation == impl
        with torch.no_grad():
            scores[impl] = model.eval()(_batch(cfg, backbone_))["logits"]
    assert GenSRConfig().model.attn_implementation == "sdpa"
    torch.testing.assert_close(scores["sdpa"], scores["eager"], rtol=1e-4, atol=1e-5)


def test_an_unavailable_attention_implementation_names_the_setting(data):
    cfg = _config(data, "tiny-t5", **{"model.attn_implementation": "flash_attention_2"})
    with pytest.raises(ValueError, match="model.attn_implementation='flash_attention_2'"):
        build_model(cfg, resolve_config_backbone(cfg))


@pytest.mark.parametrize("backbone", ["tiny-llama", "tiny-t5"])
def test_bf16_scoring_agrees_with_fp32(data, backbone):
    """The scorer in bf16 (what GPUs run) ranks as the fp32 path does, on both code paths
    (decoder: shared-prefix groups, on title_text's long shared prefix; encoder-decoder: full
    prompts, on the short minimal prompt: over title_text's ~170 tokens the random tiny T5's
    bf16 error grows to ~8 % of the scores' scale on some draws of its weights, which says
    nothing about the scoring code)."""
    import numpy as np

    from gensr_ray.eval.gensr_scorer import GenSRScorer

    examples = contract.read_table(contract.examples_dir(data, "test")).slice(0, 6).to_pydict()
    candidates = np.array([[t] + n[:19] for t, n in zip(examples["target"],
                                                         examples["negatives"])])
    scores = {}
    for precision in ("fp32", "bf16"):
        prompt = "title_text" if backbone == "tiny-llama" else "minimal"
        cfg = _config(data, backbone, **{"eval.precision": precision, "model.prompt": prompt})
        model, backbone_ = build_model(cfg, resolve_config_backbone(cfg))
        for p in model.parameters():  # non-zero adapters: the scores depend on them
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))
        scorer = GenSRScorer(model, backbone_, cfg, {}, depth=20, batch_size=40)
        assert next(scorer.model.parameters()).dtype == DTYPES[precision]
        assert scorer.model.cf_items.dtype == DTYPES[precision]
        scores[precision] = scorer.score(examples, candidates)
    # bf16 keeps 8 significant bits: a few units of 2^-8 relative to the scores' magnitude
    scale = np.abs(scores["fp32"]).max()
    assert scores["fp32"].std() > 0.01  # candidates are told apart
    np.testing.assert_allclose(scores["bf16"], scores["fp32"], atol=2 ** -5 * scale)
    # candidate pairs fp32 tells apart by more than bf16's resolution keep their order
    fp32, bf16 = scores["fp32"], scores["bf16"]
    gap = fp32[:, :, None] - fp32[:, None, :]
    decisive = np.abs(gap) > 2 ** -6 * scale
    same = np.sign(gap) == np.sign(bf16[:, :, None] - bf16[:, None, :])
    assert decisive.sum() > 100 and same[decisive].mean() >= 0.98, same[decisive].mean()


class _Planted:
    """What an attacker with write access to checkpoint storage could put in a file: an
    object whose unpickling runs code (here: creates a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_loads_a_checkpoint_and_refuses_one_that_would_run_code(data, tmp_path):
    from gensr_ray.checkpoint import CheckpointError
    from gensr_ray.train.strategy import CHECKPOINT_STATE, TAG

    cfg = _config(data, **{"scale.precision": "bf16"})
    strategy, engine, backbone = _engine(cfg)
    batch = _batch(cfg, backbone)
    _train(cfg, strategy, engine, batch, 2)
    strategy.save(tmp_path, {"step": 2, "epoch": 0, "micro": 2})
    with torch.no_grad():
        expected = engine.module.eval()(batch)["logits"]

    resumed, engine2, _ = _engine(cfg)  # a fresh engine, as a restarted worker builds it
    state = resumed.load(tmp_path)
    assert {k: state[k] for k in ("step", "epoch", "micro")} == {"step": 2, "epoch": 0, "micro": 2}
    with torch.no_grad():
        torch.testing.assert_close(engine2.module.eval()(batch)["logits"], expected,
                                   rtol=0, atol=0)

    marker = tmp_path / "code-ran"
    states = sorted((tmp_path / CHECKPOINT_STATE / TAG).glob("*model_states.pt"))
    assert states
    torch.save({"module": _Planted(marker)}, states[0])
    third, _, _ = _engine(cfg)
    with pytest.raises(CheckpointError, match=f"{states[0].name}: refused to load"):
        third.load(tmp_path)
    assert not marker.exists()
