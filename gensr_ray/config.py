"""Typed configuration: nested dataclasses, YAML values, dotted `--set a.b=c` overrides.

The same `load_config` + `apply_overrides` serve the CLI, Tune trials and tests; unknown keys
are errors, and every field says what it is for in its `help` metadata.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The valid values of choice settings. They live here, below every module that implements
# them, so a config is checked when it loads (CLI, sweep files, tests), not in a Ray worker;
# the implementing modules check at import that they build exactly these.
PROMPT_DESIGNS = ("authors", "title_text", "title_text_inline", "no_history_titles",
                  "no_soft_tokens", "minimal", "task_free")
MODEL_KINDS = ("generative", "discriminative")
SUBSPACES = ("shared_lora", "task_lora", "task_and_shared_lora", "full")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK")
FIRST_STAGES = ("lightgcn", "sasrec", "popularity")  # dense: serve both tasks
SEARCH_FIRST_STAGES = ("", *FIRST_STAGES, "bm25")  # "": the same as eval.first_stage
DATASETS_TO_PREPARE = ("", "ml100k", "synthetic")  # those that need no input files
SPLITS = ("valid", "test")
FAISS_INDEXES = ("flat", "ivf")
PRECISIONS = ("fp32", "bf16", "fp16")
ATTENTION = ("sdpa", "eager", "flash_attention_2")
NEGATIVE_SOURCES = ("stored", "fresh")
LR_SCHEDULES = ("constant", "cosine")
# What validation during training reports (sampled protocol, valid split): train.best_metric
# names one of them
VALIDATION_METRICS = tuple(f"val/{task}/{metric}" for task in ("mean", "search", "rec")
                           for metric in ("NDCG@10", "HR@10"))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_NON_NEGATIVE = (lambda v: _finite(v) and v >= 0, ">= 0")
_POSITIVE = (lambda v: _finite(v) and v > 0, "> 0 (and finite)")
# Ranges of numeric settings, checked with the types when a config loads (before Ray
# starts): a wrong value is one line naming the setting, not a traceback minutes later.
RANGES: dict[str, tuple] = {
    "data.title_tokens": _AT_LEAST_1, "data.target_title_tokens": _AT_LEAST_1,
    "data.prompt_title_tokens": _AT_LEAST_1,
    "model.lora_r": _AT_LEAST_1, "model.lora_alpha": _POSITIVE,
    "model.lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.cf_dim": _AT_LEAST_1, "model.cf_heads": _AT_LEAST_1, "model.sem_heads": _AT_LEAST_1,
    "model.cf_layers": _AT_LEAST_1,
    "loss.contrastive_weight": _NON_NEGATIVE, "loss.temperature": _POSITIVE,
    "loss.listwise_weight": _NON_NEGATIVE,
    "train.epochs": _AT_LEAST_1,
    "train.max_steps": (lambda v: v == -1 or v >= 1, "-1 (run all epochs) or >= 1"),
    "train.batch_size": _AT_LEAST_1, "train.grad_accum": _AT_LEAST_1, "train.lr": _POSITIVE,
    "train.weight_decay": _NON_NEGATIVE, "train.warmup_steps": _NON_NEGATIVE,
    "train.grad_clip": _NON_NEGATIVE, "train.negatives_per_example": _AT_LEAST_1,
    "train.negative_popularity": _NON_NEGATIVE,
    "train.conflict_every": _NON_NEGATIVE, "train.conflict_examples": _AT_LEAST_1,
    "train.log_every": _AT_LEAST_1, "train.checkpoint_every": _NON_NEGATIVE,
    "train.eval_every": _NON_NEGATIVE, "train.eval_examples": _AT_LEAST_1,
    "train.patience": _NON_NEGATIVE, "eval.scorer_retries": _NON_NEGATIVE,
    "scale.num_workers": _NON_NEGATIVE, "scale.cpus_per_worker": _POSITIVE,
    "scale.object_store_gb": _NON_NEGATIVE,
    "scale.data_cpus": _POSITIVE, "scale.zero_stage": (lambda v: 0 <= v <= 3, "0, 1, 2 or 3"),
    "scale.zero3_persistence_threshold": _NON_NEGATIVE,
    "scale.max_failures": (lambda v: v >= -1, "-1 (unlimited) or >= 0"),
    "scale.num_to_keep": _AT_LEAST_1,
    "eval.max_examples": _NON_NEGATIVE, "eval.batch_size": _AT_LEAST_1,
    "eval.num_workers": _NON_NEGATIVE, "eval.cpus_per_worker": _POSITIVE,
    "eval.rerank_depth": _AT_LEAST_1, "eval.index_search_width": _AT_LEAST_1,
}


def _f(default: Any, help: str, choices: tuple | None = None, **kw: Any) -> Any:
    metadata = {"help": help, **({"choices": choices} if choices else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


@dataclass
class DataConfig:
    path: str = _f("data/synthetic", "prepared dataset directory (gensr prepare --out)")
    prepare_if_missing: str = _f("", "dataset to prepare into `path` when it does not exist "
                                     "(ml100k | synthetic; empty: fail instead)",
                                 choices=DATASETS_TO_PREPARE)
    title_tokens: int = _f(10, "tokens per history title in the semantic view (cut or padded)")
    target_title_tokens: int = _f(32, "tokens of the candidate title for its mean embedding")
    prompt_title_tokens: int = _f(12, "tokens per title when titles are written into the prompt")
    shuffle_seed: int = _f(0, "seed of the per-epoch shuffle of training examples (-1: no shuffle)")
    allow_change: bool = _f(False, "resume or evaluate a checkpoint on a dataset or LightGCN "
                                   "tables other than those it was trained on")
    item_noun: str = _f("item", "what the prompts call an item (the authors: book; "
                                "MovieLens: movie)")
    item_noun_plural: str = _f("", "its plural (empty: item_noun + s)")


@dataclass
class ModelConfig:
    backbone: str = _f("preset:tiny-llama",
                       "local HF model directory, or preset:NAME (tiny-llama, tiny-t5, "
                       "smollm2-135m, smollm2-135m-L<n> for its first n layers)")
    prompt: str = _f("authors", "prompt design by name (gensr_ray.inputs.prompts.PROMPTS; "
                                "authors: their template exactly, no title text)",
                     choices=PROMPT_DESIGNS)
    authors_splice_bug: bool = _f(False, "prompt=authors: splice as the authors' code does (one "
                                         "sentence dropped, one repeated), for comparison")
    subspace: str = _f("shared_lora",
                       "shared_lora | task_lora | task_and_shared_lora | full",
                       choices=SUBSPACES)
    lora_r: int = _f(8, "LoRA rank")
    lora_alpha: int = _f(16, "LoRA alpha")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    # _f gives a list default its own default_factory, which ruff cannot see
    lora_targets: list = _f(["q_proj", "v_proj"], "module names LoRA wraps (T5: q, v)")  # noqa: RUF009
    cf_dim: int = _f(64, "LightGCN embedding width")
    cf_heads: int = _f(2, "heads of the CF history transformer")
    cf_layers: int = _f(1, "layers of the CF history transformer (the authors: 1; SASRec, "
                           "which reads the same item sequence: 2)")
    sem_heads: int = _f(2, "heads of the 1-layer semantic history transformer")
    use_cf: bool = _f(True, "collaborative view (False: its soft tokens are zero vectors)")
    use_sem: bool = _f(True, "semantic view (False: its soft token is a zero vector)")
    history_positions: bool = _f(False, "add a learned embedding of each history item's "
                                        "recency (0: the latest) in both views' encoders, as "
                                        "SASRec does; the authors' encoders see the history "
                                        "as a set")
    cf_item_offsets: bool = _f(False, "a trained offset per item (zero at first) added to the "
                                      "frozen LightGCN vectors of history and candidate: lets "
                                      "the CF view learn what the frozen table lacks, e.g. "
                                      "popularity (items x cf_dim parameters)")
    item_popularity: bool = _f(False, "add a learned embedding (zero at first) of each item's "
                                      "popularity bucket, log2 of its train interactions, to "
                                      "its CF vector (history and candidate): popularity "
                                      "stated outright, shared by items of a bucket")
    attn_implementation: str = _f("sdpa", "backbone attention: sdpa | eager | "
                                          "flash_attention_2 (needs flash-attn, GPUs, bf16/fp16)",
                                  choices=ATTENTION)
    gradient_checkpointing: bool = _f(False, "recompute the backbone's activations in backward "
                                             "(less memory, ~30 % more compute)")
    query_in_prompt: bool = _f(True, "insert the query into search prompts (False reproduces "
                                     "the authors' bug: search prompts are query-blind)")
    kind: str = _f("generative", "generative: the LM answers Yes/No to a task's question "
                                 "(GenSR); discriminative: the twin GenSR argues against, the "
                                 "task_free prompt encoded once, one linear head per task on "
                                 "the shared representation (BCE)", choices=MODEL_KINDS)


@dataclass
class LossConfig:
    contrastive_weight: float = _f(0.01, "lambda of the CF/semantic InfoNCE term")
    temperature: float = _f(0.07, "InfoNCE temperature")
    listwise_weight: float = _f(0.0, "weight of a softmax cross-entropy of each training "
                                     "example's target against its negatives (answer "
                                     "scores); > 0 keeps an example's rows in one batch")
    authors_layernorm: bool = _f(False, "reproduce the authors' LayerNorm after L2 "
                                        "normalisation (logits near 1e4); not a true cosine")


@dataclass
class TrainConfig:
    epochs: int = _f(1, "passes over the training examples")
    max_steps: int = _f(-1, "stop after this many optimizer steps (-1: run all epochs)")
    batch_size: int = _f(20, "pointwise rows per worker per micro-batch (1 example = "
                             "1 positive + its stored negatives)")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(1e-4, "AdamW learning rate")
    weight_decay: float = _f(1e-3, "AdamW weight decay")
    warmup_steps: int = _f(200, "linear warm-up steps")
    lr_schedule: str = _f("constant", "after the warm-up: constant | cosine (decays to 0 at "
                                      "train.max_steps, which it needs)", choices=LR_SCHEDULES)
    grad_clip: float = _f(1.0, "gradient clipping norm")
    negatives_per_example: int = _f(4, "stored negatives used per training example (<= 4)")
    negatives: str = _f("stored", "stored: every epoch trains on the negatives prepare stored | "
                                  "fresh: each epoch draws its own, by the same rule (items "
                                  "the user never touched)", choices=NEGATIVE_SOURCES)
    negative_popularity: float = _f(0.0, "with negatives=fresh: draw an item with probability "
                                         "proportional to (its training interactions + 1) to "
                                         "this power (0: uniform, as stored; 1: as popular as "
                                         "the positives)")
    conflict_every: int = _f(0, "every N steps, the search/rec gradient cosine on one fixed "
                                "seeded batch (conflict/* metrics; 0: off; needs grad_accum "
                                "1); `gensr diagnose` measures a checkpoint")
    conflict_examples: int = _f(16, "training examples of each task in that batch")
    seed: int = _f(42, "seed of model init and data order")
    log_every: int = _f(10, "report metrics every N optimizer steps")
    checkpoint_every: int = _f(0, "checkpoint every N optimizer steps (0: each epoch end)")
    eval_every: int = _f(0, "validate every N optimizer steps, and at every checkpoint (0: "
                            "never); each validation writes a checkpoint, and the best by "
                            "train.best_metric is kept")
    eval_examples: int = _f(100, "validation examples per task, a subset seeded by eval.seed "
                                 "(sampled protocol, valid split)")
    best_metric: str = _f("val/mean/NDCG@10", "validation metric that ranks checkpoints "
                                              "(higher is better)", choices=VALIDATION_METRICS)
    patience: int = _f(0, "stop after this many validations without a new best "
                          "train.best_metric (0: never stop early)")


@dataclass
class ScaleConfig:
    num_workers: int = _f(1, "Ray Train workers (0: Ray Train local mode, in this process)")
    use_gpu: bool = _f(False, "one GPU per worker, NCCL; False: CPU accelerator and gloo")
    cpus_per_worker: float = _f(0.5, "CPUs reserved per worker; leave some for Ray Data")
    data_cpus: float = _f(0.5, "CPUs a Tune trial reserves for its Ray Data read/tokenize "
                               "tasks (outside Tune they use the CPUs workers leave free)")
    zero_stage: int = _f(3, "DeepSpeed ZeRO stage")
    zero3_persistence_threshold: int = _f(
        100_000, "ZeRO-3: parameters of fewer elements stay whole on every rank instead of being "
                 "gathered at each use (LoRA adapters, norms, GenSR's small modules)")
    precision: str = _f("fp32", "compute dtype of the model under DeepSpeed: fp32 | bf16 (GPUs; "
                                "the CPU accelerator too) | fp16 (decoder backbones, loss "
                                "scaling; GPUs, CPUs with AVX512-FP16 or AMX); optimizer "
                                "states and exported weights stay fp32",
                        choices=PRECISIONS)
    fused_adam: bool = _f(False, "DeepSpeed's FusedAdam (compiles at first use) instead of "
                                 "torch's AdamW, which is fused (no compiler) on GPUs")
    offload_optimizer: bool = _f(False, "ZeRO-Offload of optimizer states to CPU (compiles)")
    storage_path: str = _f("", "where Ray Train persists checkpoints (local dir or s3://, "
                               "gs://); empty: <out>/ray")
    max_failures: int = _f(0, "worker-group restarts from the latest checkpoint on failure "
                              "(-1: unlimited)")
    placement_strategy: str = _f("PACK", "where workers go: PACK | SPREAD | STRICT_SPREAD "
                                         "(one node each) | STRICT_PACK",
                                     choices=PLACEMENT_STRATEGIES)
    num_to_keep: int = _f(2, "checkpoints kept")
    object_store_gb: float = _f(0.0, "object store of a local cluster this process starts, "
                                     "GiB (0: 30 % of this machine's memory, within /dev/shm); "
                                     "a cluster's own is set by `ray start`")


@dataclass
class EvalConfig:
    split: str = _f("test", "valid | test", choices=SPLITS)
    max_examples: int = _f(0, "seeded subset of examples per task (0: all)")
    seed: int = _f(0, "seed of that subset")
    batch_size: int = _f(200, "rows per scoring forward pass")
    num_workers: int = _f(2, "Ray workers scoring GenSR, each holding the model (0: in this "
                             "process, for debugging)")
    cpus_per_worker: float = _f(1.0, "CPUs per scoring worker")
    scorer_retries: int = _f(2, "times a pass is resumed on a fresh pool of scoring workers, "
                                "for the examples not yet scored, after a worker died")
    use_gpu: bool = _f(False, "score on the GPU (cuda) instead of the CPU")
    precision: str = _f("fp32", "dtype GenSR scores in: fp32 | bf16 | fp16 (bf16 on GPUs: "
                                "half the memory, tensor cores)", choices=PRECISIONS)
    rerank_depth: int = _f(50, "first-stage candidates GenSR reranks in the full protocol")
    first_stage: str = _f("lightgcn", "dense first stage of the full protocol: lightgcn | "
                                      "sasrec | popularity (bm25 too for search)",
                          choices=FIRST_STAGES)
    first_stage_search: str = _f("", "first stage for search only (empty: first_stage; "
                                     "bm25 allowed)", choices=SEARCH_FIRST_STAGES)
    index: str = _f("flat", "faiss index of full-catalogue retrieval: flat (exact) | ivf "
                            "(approximate, for catalogues of millions of items; "
                            "bench/retrieval.py measures its recall)", choices=FAISS_INDEXES)
    index_search_width: int = _f(64, "ivf: inverted lists probed per query (more: higher "
                                     "recall, slower)")


@dataclass
class LogConfig:
    wandb: bool = _f(False, "log each report to Weights & Biases through Ray's integration "
                            "(rank 0; WANDB_MODE=offline keeps it on disk)")
    mlflow: bool = _f(False, "log each report to MLflow through Ray's integration (rank 0; "
                             "'@' in metric names becomes '_at_')")
    project: str = _f("gensr", "W&B project and MLflow experiment")
    mlflow_tracking_uri: str = _f("", "MLflow tracking URI (empty: $MLFLOW_TRACKING_URI, "
                                      "else <out>/mlruns)")


@dataclass
class GenSRConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A config file or override names an unknown key or gives a value of the wrong type."""


def from_dict(data: dict, cls: type = GenSRConfig, where: str = "") -> Any:
    """Build a (nested) config dataclass from plain data, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; known: {sorted(names)}")
    values = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = from_dict(value or {}, kind, key)
            continue
        values[name] = _coerce(value, kind, key)
        check = RANGES.get(key)
        if check and not check[0](values[name]):
            raise ConfigError(f"{key}={values[name]!r} is out of range: must be {check[1]}")
        choices = fields[name].metadata.get("choices")
        if choices and values[name] not in choices:
            shown = ", ".join(repr(c) if c == "" else c for c in choices)
            raise ConfigError(f"{key}={values[name]!r} is not a valid choice; expected one of: "
                              f"{shown}")
    config = cls(**values)
    if cls is GenSRConfig and config.train.lr_schedule == "cosine" and config.train.max_steps < 1:
        raise ConfigError("train.lr_schedule=cosine decays over train.max_steps: set it too "
                          "(got train.max_steps=-1, run all epochs)")
    if cls is GenSRConfig and config.train.conflict_every and config.train.grad_accum > 1:
        raise ConfigError("train.conflict_every measures one backward per task between steps: "
                          f"it needs train.grad_accum=1 (got {config.train.grad_accum})")
    if cls is GenSRConfig and config.model.kind == "discriminative" and \
            config.model.prompt != "task_free":
        raise ConfigError("model.kind=discriminative reads the task-free input: set "
                          f"model.prompt=task_free (got model.prompt={config.model.prompt!r})")
    if cls is GenSRConfig and config.train.negative_popularity and \
            config.train.negatives != "fresh":
        raise ConfigError("train.negative_popularity weights the draws of fresh negatives: set "
                          f"train.negatives=fresh (got train.negatives="
                          f"{config.train.negatives!r})")
    if cls is GenSRConfig and config.model.authors_splice_bug and config.model.prompt != "authors":
        raise ConfigError("model.authors_splice_bug=true applies to model.prompt=authors only "
                          f"(got model.prompt={config.model.prompt!r})")
    return config


def _coerce(value: Any, kind: Any, key: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is list and isinstance(value, (list, tuple)):
        return list(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    return value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> GenSRConfig:
    data = read_yaml_mapping(path, "config") if path is not None else {}
    try:
        return apply_overrides(from_dict(data), overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """The top-level mapping of a YAML file (`what`: config, sweep) that must exist; an empty
    file is an empty mapping. ConfigError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def read_yaml(path: Path) -> Any:
    """The plain data of a YAML file (yaml.safe_load). ConfigError, naming the file and the
    line, for text that is not YAML and for tags such as `!!python/object` (safe_load builds
    no Python objects; config and sweep files hold mappings, lists and scalars only)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {_yaml_problem(exc, text)}") from None


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """`line N: what is wrong` for a PyYAML error, without its traceback-style excerpt."""
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow
        line = text[:exc.position].count("\n") + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character[:1])
        return f"line {line}: not valid YAML: character #x{char:04x} is not allowed"
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(exc, "problem", None) or str(exc)
    tag = re.search(r"constructor for the tag '([^']*)'", problem)
    if tag:
        name = re.sub(r"^tag:yaml\.org,2002:", "!!", tag.group(1))
        return (f"{where}the tag {name} is not allowed: only plain values (mappings, lists, "
                "strings, numbers, booleans), no Python objects")
    context = getattr(exc, "context", None)
    if context and getattr(exc, "context_mark", None) and mark is not exc.context_mark:
        problem += f" ({context} from line {exc.context_mark.line + 1})"
    return f"{where}not valid YAML: {problem}"


def apply_overrides(config: GenSRConfig, overrides: list[str] | dict) -> GenSRConfig:
    """Return a copy with `a.b=c` overrides applied (values parsed as YAML scalars)."""
    data = config.to_dict()
    items = overrides.items() if isinstance(overrides, dict) else (_split(o) for o in overrides)
    for dotted, value in items:
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {dotted!r}: unknown section {part!r}")
            node = node[part]
        if parts[-1] not in node or isinstance(node[parts[-1]], dict):
            raise ConfigError(f"override {dotted!r}: unknown key {parts[-1]!r}")
        node[parts[-1]] = value
    return from_dict(data)


def _split(override: str) -> tuple[str, Any]:
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key.path=value")
    key, raw = override.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = re.sub(r"^line 1, column \d+: ", "", _yaml_problem(exc, raw))
        raise ConfigError(f"override {override!r}: {problem}") from None


def describe_settings(cls: type = GenSRConfig, where: str = "") -> list[dict]:
    """Every setting as {"key", "type", "default", "choices", "help"}, in declaration order
    (`gensr config help`)."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe_settings(hints[f.name], key)
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        rows.append({"key": key, "type": hints[f.name].__name__, "default": default,
                     "choices": f.metadata.get("choices"), "help": f.metadata.get("help", ""),
                     "range": RANGES[key][1] if key in RANGES else None})
    return rows

