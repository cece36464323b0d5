"""GenSR's pure parts against brute-force references, and prompt assembly."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from gensr_ray.config import ConfigError, GenSRConfig, apply_overrides
from gensr_ray.inputs.prompts import BLIND_QUERY, PROMPTS, SOFT_TOKENS, PromptAssembler
from gensr_ray.model.gensr import EncoderLayer, GenSR, TargetAttention, popularity_buckets
from gensr_ray.model.losses import (answer_loss, answer_score, first_rows, info_nce,
                                    listwise_loss)


def test_info_nce_matches_a_loop_reference():
    torch.manual_seed(0)
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    t = 0.07
    total = 0.0
    for x, y in ((a, b), (b, a)):
        for i in range(5):
            sims = [float(torch.dot(x[i], y[j]) / (x[i].norm() * y[j].norm())) / t for j in range(5)]
            total += -(sims[i] - math.log(sum(math.exp(s) for s in sims)))
    assert info_nce(a, b, t).item() == pytest.approx(total / 10, rel=1e-5)


def test_info_nce_authors_layernorm_inflates_logits():
    torch.manual_seed(0)
    a = torch.randn(4, 64)
    # aligned views: the true cosine loss is small but finite; the quirk saturates it to ~0
    assert info_nce(a, a, 0.07).item() < 0.1
    assert info_nce(a, a, 0.07, authors_layernorm=True).item() < 1e-6


def test_answer_loss_and_score():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    label = torch.tensor([1.0, 0.0])
    p_yes = torch.softmax(logits, -1)[:, 0]
    expected = -(torch.log(p_yes[0]) + torch.log(1 - p_yes[1])) / 2
    assert answer_loss(logits, label).item() == pytest.approx(expected.item())
    assert torch.equal(answer_score(logits).argsort(), p_yes.argsort())


def test_listwise_loss_is_each_whole_examples_softmax_over_its_candidates():
    # rows out of order, as a batch may cut them: example 7 whole (target first), example 3
    # whole (target last), example 9 cut off before its target, example 5 its target alone
    group = torch.tensor([7, 3, 7, 9, 3, 7, 5, 3])
    label = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    values = [2.0, -1.0, 0.5, 4.0, 3.0, -2.0, 9.0, 1.0]
    scores = torch.tensor(values, requires_grad=True)
    loss = listwise_loss(scores, group, label)
    expected = []
    for example in (7, 3):
        rows = [i for i in range(8) if int(group[i]) == example]
        target = next(i for i in rows if label[i] == 1)
        lse = math.log(sum(math.exp(values[i]) for i in rows))
        expected.append(lse - values[target])
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    loss.backward()
    assert scores.grad[3] == 0 and scores.grad[6] == 0  # counted examples only
    # large scores do not overflow: the softmax is shifted by each example's maximum
    assert torch.isfinite(listwise_loss(scores.detach() * 100, group, label))
    # no whole example: a zero that still backpropagates
    lone = torch.tensor([1.0, 2.0], requires_grad=True)
    zero = listwise_loss(lone, torch.tensor([1, 2]), torch.tensor([1.0, 0.0]))
    assert zero.item() == 0.0
    zero.backward()


def test_first_rows_picks_each_example_once_in_batch_order():
    assert first_rows(torch.tensor([7, 7, 3, 7, 9, 3])).tolist() == [0, 2, 4]


def test_target_attention_matches_a_loop_reference():
    torch.manual_seed(0)
    att = TargetAttention(6)
    h, e = torch.randn(3, 4, 6), torch.randn(3, 6)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    out = att(h, e, mask)
    W = att.proj.weight
    for b in range(3):
        valid = [j for j in range(4) if mask[b, j]]
        scores = torch.stack([h[b, j] @ (W @ e[b]) for j in valid])
        weights = torch.softmax(scores, 0)
        expected = sum(w * h[b, j] for w, j in zip(weights, valid))
        torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-6)
    # several targets per sequence (scoring's candidates): each as if alone with its sequence
    targets = torch.randn(3, 5, 6)
    grouped = att(h, targets, mask)
    assert grouped.shape == (3, 5, 6)
    for c in range(5):
        torch.testing.assert_close(grouped[:, c], att(h, targets[:, c], mask), rtol=1e-5,
                                   atol=1e-6)


def test_encoder_layer_matches_torch_transformer_encoder_layer():
    torch.manual_seed(0)
    ours = EncoderLayer(8, 2, 16)
    ref = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    with torch.no_grad():
        for a, b in ((ref.self_attn.in_proj_weight, ours.qkv.weight),
                     (ref.self_attn.in_proj_bias, ours.qkv.bias),
                     (ref.self_attn.out_proj.weight, ours.out.weight),
                     (ref.self_attn.out_proj.bias, ours.out.bias),
                     (ref.linear1.weight, ours.ff_in.weight), (ref.linear1.bias, ours.ff_in.bias),
                     (ref.linear2.weight, ours.ff_out.weight), (ref.linear2.bias, ours.ff_out.bias),
                     (ref.norm1.weight, ours.norm_attn.weight),
                     (ref.norm1.bias, ours.norm_attn.bias),
                     (ref.norm2.weight, ours.norm_ff.weight), (ref.norm2.bias, ours.norm_ff.bias)):
            b.copy_(a)
    # initialised like torch's layer: zero attention biases, Xavier-uniform q/k/v weights
    fresh = EncoderLayer(8, 2, 16)
    assert not fresh.qkv.bias.any() and not fresh.out.bias.any()
    assert fresh.qkv.weight.abs().max() <= math.sqrt(6 / (8 + 24))
    x = torch.randn(3, 5, 8)
    keep = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    expected = ref(x, src_key_padding_mask=~keep)
    got = ours(x, keep)
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-5, atol=1e-5)


def test_splice_puts_each_soft_vector_at_its_slot():
    embeds = torch.zeros(2, 5, 3)
    slots = torch.tensor([[0, 1, 0, 2, 4], [3, 0, 0, 0, 1]])
    soft = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3) + 1
    out = GenSR.splice(embeds, slots, soft)
    for b in range(2):
        for t in range(5):
            k = int(slots[b, t])
            expected = soft[b, k - 1] if k else torch.zeros(3)
            assert torch.equal(out[b, t], expected)


class _WordTokenizer:
    """A whitespace tokenizer over a growing vocabulary (prompt assembly needs only encode)."""

    pad_token_id, eos_token_id = 0, 1

    def __init__(self):
        self.vocab = {"<pad>": 0, "</s>": 1}

    def encode(self, text, add_special_tokens=False):
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]

    def decode(self, ids):
        inverse = {v: k for k, v in self.vocab.items()}
        return " ".join(inverse[i] for i in ids)


@pytest.mark.parametrize("design", sorted(PROMPTS))
def test_prompt_slots_follow_the_template_and_query_only_in_search(design):
    tok = _WordTokenizer()
    titles = [tok.encode(t) for t in ("alpha film", "beta film", "gamma film")]
    assembler = PromptAssembler(tok, design, titles)
    for task in ("search", "rec"):
        template = PROMPTS[design][task]
        prompt = assembler.build(task, history=[0, 1], target=2, query="zebra quest")
        order = sorted((template.index(s), SOFT_TOKENS.index(s) + 1)
                       for s in SOFT_TOKENS if s in template)
        assert [s for s in prompt.slots if s] == [k for _, k in order]
        text = tok.decode([i for i, s in zip(prompt.ids, prompt.slots) if s == 0])
        assert ("zebra quest" in text) == (task == "search")
        assert ("gamma film" in text) == ("{target_title}" in template)
        assert ("alpha film" in text) == ("{history_titles}" in template)
        first_soft = next((i for i, s in enumerate(prompt.slots) if s), len(prompt.ids))
        assert prompt.prefix_len <= first_soft


def test_title_text_puts_everything_a_candidate_changes_at_its_end():
    """Scoring shares an example's prompt up to its first candidate-dependent piece: in
    title_text only the candidate's title, the four soft vectors and the answer cue follow."""
    tok = _WordTokenizer()
    titles = [tok.encode(t) for t in ("alpha film", "beta film", "gamma delta film")]
    assembler = PromptAssembler(tok, "title_text", titles)
    for task in ("search", "rec"):
        prompt = assembler.build(task, history=[0, 1], target=2, query="zebra quest")
        suffix = prompt.ids[prompt.prefix_len:]
        assert len(suffix) == len(titles[2]) + len(SOFT_TOKENS) + len(tok.encode(". Answer:"))
        assert "alpha film" in tok.decode(prompt.ids[:prompt.prefix_len])


# The authors' templates as their get_prompt (GenSR/data/UnifyDataset.py) writes them.
THEIR_TEMPLATES = {
    "rec": """
                    ### Question:
                    A user has given high ratings to the following books: <ItemTitleList>. The semantic features of these books are <ItemFeatureList>.
                    Using all available information, make a prediction about whether the user would enjoy the book <TargetItemTitle> with the semantic feature <TargetItemID>?
                    Answer with "Yes" or "No".
                    \n #Answer:
                """,  # noqa: E501
    "search": """
                    ### Question:
                    A user has given high ratings to the following books: <ItemTitleList>. The semantic features of these books are <ItemFeatureList>.
                    Using all available information, make a prediction about whether the user would enjoy the book <TargetItemTitle> with the semantic feature <TargetItemID> based on the query <Query>?
                    Answer with "Yes" or "No".
                    \n #Answer:
                """,  # noqa: E501
}


def _their_segments(task: str, query: str, splice_bug: bool) -> list[str]:
    """The five text pieces their collator (UnifyCollator.py) cuts, whitespace runs made one
    space; with `splice_bug` their third piece exactly as they take it."""
    text = " ".join(THEIR_TEMPLATES[task].split()).replace("<Query>", query)
    first, rest = text.split("<ItemTitleList>")
    second = rest.split("<ItemFeatureList>")[0]
    after_features = text.split("<ItemFeatureList>")[1]
    third = after_features.split("<TargetItemTitle>")[1 if splice_bug else 0]
    fourth = text.split("<TargetItemTitle>")[1].split("<TargetItemID>")[0]
    fifth = text.split("<TargetItemID>")[1]
    return [first, second, third, fourth, fifth]


class _PunctuationTokenizer(_WordTokenizer):
    """Words and single punctuation marks, as the tiny presets' tokenizer splits text: a
    query inserted before "?" tokenizes the same alone as inside the template's text."""

    def encode(self, text, add_special_tokens=False):
        return [self.vocab.setdefault(w, len(self.vocab)) for w in re.findall(r"\w+|[^\w\s]",
                                                                               text)]


@pytest.mark.parametrize("splice_bug", [False, True])
@pytest.mark.parametrize("task", ["rec", "search"])
def test_the_authors_prompt_is_their_template_token_for_token(task, splice_bug):
    tok = _PunctuationTokenizer()
    titles = [tok.encode(t) for t in ("alpha film", "beta film", "gamma film")]
    assembler = PromptAssembler(tok, "authors", titles, item_noun="book", splice_bug=splice_bug)
    prompt = assembler.build(task, history=[0, 1], target=2, query="zebra quest")
    ids, slots = [], []
    for k, segment in enumerate(_their_segments(task, "zebra quest", splice_bug)):
        if k:  # their four vectors, in their order, between the five pieces
            ids.append(tok.pad_token_id)
            slots.append(k)
        ids += tok.encode(segment)
        slots += [0] * len(tok.encode(segment))
    assert prompt.ids == ids and prompt.slots == slots
    text = tok.decode(prompt.ids)
    assert "film" not in text  # no title reaches the model
    assert ("Using all available information" in text) != splice_bug  # the dropped sentence
    assert text.count("with the semantic feature") == (2 if splice_bug else 1)
    assert ("zebra quest" in text) == (task == "search")


def test_the_splice_bug_switch_needs_the_authors_prompt():
    with pytest.raises(ConfigError, match="applies to model.prompt=authors only"):
        apply_overrides(GenSRConfig(), {"model.prompt": "minimal",
                                        "model.authors_splice_bug": True})


def test_query_blind_prompts_reproduce_the_authors_bug():
    tok = _WordTokenizer()
    assembler = PromptAssembler(tok, "authors", [tok.encode("x")], query_in_prompt=False)
    prompt = assembler.build("search", [0], 0, "zebra quest")
    text = tok.decode(prompt.ids)
    assert "zebra" not in text and BLIND_QUERY in text


def test_unknown_prompt_and_subspace_are_rejected():
    tok = _WordTokenizer()
    with pytest.raises(ValueError, match="unknown prompt design 'nope'"):
        PromptAssembler(tok, "nope", [])
    from gensr_ray.model.gensr import apply_subspace

    with pytest.raises(ValueError, match="model.subspace='nope'"):
        apply_subspace(torch.nn.Linear(2, 2), apply_overrides(
            GenSRConfig(), {"model.subspace": "nope"}).model)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, model_cache):
    from gensr_ray.cf.lightgcn import LightGCNConfig, save_cf, train_lightgcn
    from gensr_ray.data import contract
    from gensr_ray.data.synthetic import SyntheticOptions, generate_synthetic
    from gensr_ray.data.writer import write_dataset

    def with_cf(tmp):
        save_cf(train_lightgcn(tmp, LightGCNConfig(epochs=2)), contract.cf_path(tmp))

    out = tmp_path_factory.mktemp("model") / "data"
    write_dataset(generate_synthetic(SyntheticOptions(seed=2, n_users=20, n_items=130, events_per_user=8)), out,
                  after_build=with_cf)
    return out


@pytest.mark.parametrize("backbone, targets", [("tiny-llama", ["q_proj", "v_proj"]),
                                               ("tiny-t5", ["q", "v"])])
@pytest.mark.parametrize("subspace", ["shared_lora", "task_and_shared_lora", "full"])
def test_every_backbone_and_subspace_trains(tiny_data, backbone, targets, subspace):
    from gensr_ray.assemble import build_model, resolve_config_backbone
    from gensr_ray.data import contract
    from gensr_ray.inputs.build import build_features
    from gensr_ray.model.gensr import gensr_loss

    cfg = apply_overrides(GenSRConfig(), {
        "data.path": str(tiny_data), "model.backbone": f"preset:{backbone}",
        "model.subspace": subspace, "model.lora_targets": targets})
    model, backbone_ = build_model(cfg, resolve_config_backbone(cfg))
    encoder, collate = build_features(cfg, backbone_.tokenizer, backbone_.kind)
    examples = contract.read_table(contract.examples_dir(tiny_data, "train")).slice(0, 8)
    batch = collate(encoder.encode(examples.to_pydict(), negatives_per_example=4))
    assert set(batch["task"].tolist()) == {0, 1}  # both tasks, so task adapters both run
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # two steps: LoRA A only gets gradients once B has left zero
        optimizer.zero_grad()
        loss, parts = gensr_loss(model(batch), batch["label"], cfg.loss, cfg.model)
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss) and "loss_contrastive" in parts
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if subspace == "full":
        assert frozen == []
    else:
        assert frozen and not any("lora_" in n for n in frozen)
        adapters = {n.split("lora_A.")[1].split(".")[0] for n, _ in model.named_parameters()
                    if "lora_A." in n}
        assert adapters == ({"shared"} if subspace == "shared_lora"
                            else {"shared", "search", "rec"})


def test_task_adapters_run_the_same_passes_whatever_tasks_a_batch_holds(tiny_data):
    """ZeRO-3 needs every rank to run the same module sequence: a batch missing a task
    still runs that task's pass (on one row, weight 0), and its scores do not change."""
    from gensr_ray.assemble import build_model, resolve_config_backbone
    from gensr_ray.data import contract
    from gensr_ray.inputs.build import build_features

    cfg = apply_overrides(GenSRConfig(), {
        "data.path": str(tiny_data), "model.backbone": "preset:tiny-llama",
        "model.subspace": "task_lora"})
    model, backbone = build_model(cfg, resolve_config_backbone(cfg))
    encoder, collate = build_features(cfg, backbone.tokenizer, backbone.kind)
    examples = contract.read_table(contract.examples_dir(tiny_data, "train")).slice(0, 12)
    mixed = collate(encoder.encode(examples.to_pydict(), negatives_per_example=4))
    rec_rows = (mixed["task"] == 1).nonzero(as_tuple=True)[0]
    rec_only = {k: v[rec_rows] for k, v in mixed.items()}
    assert set(mixed["task"].tolist()) == {0, 1} and set(rec_only["task"].tolist()) == {1}

    calls = []
    hook = model.lm.base_model.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        for batch in (mixed, rec_only):
            calls.clear()
            logits = model(batch)["logits"]
            assert len(calls) == 2  # one pass per task, always
            logits.sum().backward()
    finally:
        hook.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(rec_only)["logits"], model(mixed)["logits"][rec_rows],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("subspace, positions, offsets, cf_layers, prefix_attention", [
    ("shared_lora", False, False, 1, True), ("task_lora", False, False, 1, True),
    ("shared_lora", True, True, 2, True), ("shared_lora", False, False, 1, False)])
def test_shared_prefix_scoring_equals_full_prompts(tiny_data, monkeypatch, subspace, positions,
                                                   offsets, cf_layers, prefix_attention):
    from gensr_ray.assemble import build_model, resolve_config_backbone
    from gensr_ray.data import contract
    from gensr_ray.inputs.build import build_features
    from gensr_ray.model import shared_prefix

    if not prefix_attention:  # a decoder without the attention interface: the copying path
        monkeypatch.setattr(shared_prefix, "supports", lambda model: False)
    cfg = apply_overrides(GenSRConfig(), {
        "data.path": str(tiny_data), "model.backbone": "preset:tiny-llama",
        "model.prompt": "title_text", "model.subspace": subspace,
        "model.history_positions": positions, "model.cf_item_offsets": offsets,
        "model.cf_layers": cf_layers})
    model, backbone = build_model(cfg, resolve_config_backbone(cfg))
    for p in model.parameters():  # non-zero adapters (and offsets), so routing matters
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    model.eval()
    encoder, collate = build_features(cfg, backbone.tokenizer, backbone.kind)
    examples = contract.read_table(contract.examples_dir(tiny_data, "test")).slice(0, 6)
    ex = examples.to_pydict()
    singles: dict[str, list] = {}
    for i in range(6):
        candidates = [ex["target"][i]] + ex["negatives"][i][:30]
        group = encoder.encode_group(ex["task"][i], ex["history"][i], ex["query"][i], candidates)
        assert len(group["prefix_ids"]) > 10  # the authors' prompt opens with the history
        rows = encoder.encode({k: [v[i]] for k, v in ex.items()},
                              candidates=np.array([candidates]))
        with torch.no_grad():
            full = answer_score(model(collate(rows))["logits"])
        shared = answer_score(model.score_group(collate.group(group)))
        torch.testing.assert_close(shared, full, rtol=1e-4, atol=1e-5)
        singles.setdefault(ex["task"][i], []).append((group, shared))
    # the examples of a task batched in one pass: prefixes and histories of other lengths
    # padded, the same scores
    for task, pairs in singles.items():
        together = answer_score(model.score_group(collate.groups([g for g, _ in pairs])))
        torch.testing.assert_close(together, torch.cat([s for _, s in pairs]), rtol=1e-4,
                                   atol=1e-5)
    assert max(len(p) for p in singles.values()) > 1


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (3, 3), (6, 1)])
def test_shared_prefix_attention_equals_attention_over_each_candidate_s_whole_prompt(
        heads, kv_heads):
    """Against torch's attention over every candidate's prefix + suffix written out: left-
    padded prefixes of G examples, right-padded suffixes of their C candidates, grouped-query
    heads."""
    from gensr_ray.model.shared_prefix import SharedPrefix, shared_prefix_attention

    torch.manual_seed(0)
    g, c, length, steps, dim = 2, 3, 7, 5, 8
    prefix_mask = torch.ones(g, length, dtype=torch.long)
    prefix_mask[1, :3] = 0  # the second example's prefix is 3 tokens shorter
    suffix_mask = torch.ones(g * c, steps, dtype=torch.long)
    suffix_mask[1, 2:] = 0
    suffix_mask[4, 4:] = 0
    keys, values = torch.randn(g, kv_heads, length, dim), torch.randn(g, kv_heads, length, dim)
    query = torch.randn(g * c, heads, steps, dim)
    key, value = torch.randn(g * c, kv_heads, steps, dim), torch.randn(g * c, kv_heads, steps, dim)
    layer = torch.nn.Module()
    layer.layer_idx = 1
    prefix = SharedPrefix([None, keys], [None, values], prefix_mask, suffix_mask)
    out, _ = shared_prefix_attention(layer, query, key, value, scaling=0.3,
                                     shared_prefix=prefix)
    # a bf16 model's tensors: computed in fp32, returned in bf16
    low = [x.bfloat16() for x in (query, key, value, keys, values)]
    out_bf16, _ = shared_prefix_attention(
        layer, *low[:3], scaling=0.3,
        shared_prefix=SharedPrefix([None, low[3]], [None, low[4]], prefix_mask, suffix_mask))
    assert out_bf16.dtype == torch.bfloat16

    def whole(x, own):  # every candidate's prefix + suffix, each key head for its query heads
        both = torch.cat([x.repeat_interleave(c, dim=0), own], dim=2)
        return both.repeat_interleave(heads // kv_heads, dim=1)

    visible = torch.cat([prefix_mask.repeat_interleave(c, dim=0)[:, None, :].expand(-1, steps, -1),
                         torch.ones(steps, steps).tril()[None].expand(g * c, -1, -1)
                         * suffix_mask[:, None, :]], dim=2).bool()
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, whole(keys, key), whole(values, value), attn_mask=visible[:, None], scale=0.3)
    assert out.shape == (g * c, steps, heads, dim)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_bf16.float(), out, rtol=0.02, atol=0.02)


def test_the_discriminative_twin_heads_one_logit_per_task(tiny_data):
    """model.kind=discriminative: the task-free input, one linear head per task on the shared
    representation; each task's loss trains its own head row only, and the shared-prefix
    scorer gives the full prompts' scores."""
    from gensr_ray.assemble import build_model, resolve_config_backbone
    from gensr_ray.config import ConfigError
    from gensr_ray.data import contract
    from gensr_ray.inputs.build import build_features
    from gensr_ray.model.gensr import gensr_loss

    with pytest.raises(ConfigError, match="model.kind=discriminative reads the task-free input"):
        apply_overrides(GenSRConfig(), {"model.kind": "discriminative"})
    cfg = apply_overrides(GenSRConfig(), {
        "data.path": str(tiny_data), "model.backbone": "preset:tiny-llama",
        "model.prompt": "task_free", "model.kind": "discriminative"})
    model, backbone = build_model(cfg, resolve_config_backbone(cfg))
    assert model.task_heads.weight.requires_grad and model.task_heads.weight.shape[0] == 2
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    encoder, collate = build_features(cfg, backbone.tokenizer, backbone.kind)
    examples = contract.read_table(contract.examples_dir(tiny_data, "train")).slice(0, 12)
    batch = collate(encoder.encode(examples.to_pydict(), negatives_per_example=4))
    search = {k: v[batch["task"] == 0] for k, v in batch.items()}
    logits = model(search)["logits"]
    assert torch.equal(logits[:, 1], torch.zeros_like(logits[:, 1]))
    loss, _ = gensr_loss(model(search), search["label"], cfg.loss, cfg.model)
    loss.backward()
    grad = model.task_heads.weight.grad
    assert grad[0].abs().sum() > 0 and torch.equal(grad[1], torch.zeros_like(grad[1]))

    model.eval()
    test = contract.read_table(contract.examples_dir(tiny_data, "test")).slice(0, 4).to_pydict()
    for i in range(4):
        candidates = [test["target"][i]] + test["negatives"][i][:20]
        rows = encoder.encode({k: [v[i]] for k, v in test.items()},
                              candidates=np.array([candidates]))
        group = encoder.encode_group(test["task"][i], test["history"][i], test["query"][i],
                                     candidates)
        with torch.no_grad():
            full = answer_score(model(collate(rows))["logits"])
            shared = answer_score(model.score_group(collate.group(group)))
        torch.testing.assert_close(shared, full, rtol=1e-4, atol=1e-5)


def _reversed_histories(batch: dict) -> dict:
    """The same rows with each history's real items in the opposite order."""
    out = dict(batch)
    for key in ("hist_items", "hist_mask", "hist_title_ids", "hist_title_mask"):
        out[key] = batch[key].clone()
    for r, length in enumerate(batch["hist_mask"].sum(1).tolist()):
        for key in ("hist_items", "hist_title_ids", "hist_title_mask"):
            out[key][r, :length] = batch[key][r, :length].flip(0)
    return out


def _seeded_model_and_batch(tiny_data, split: str, overrides: dict):
    """A tiny-Llama GenSR (`minimal` prompt, seed 0 before it is built) with `overrides`,
    and the pointwise batch of the first 8 examples of `split`."""
    from gensr_ray.assemble import build_model, resolve_config_backbone
    from gensr_ray.data import contract
    from gensr_ray.inputs.build import build_features

    cfg = apply_overrides(GenSRConfig(), {
        "data.path": str(tiny_data), "model.backbone": "preset:tiny-llama",
        "model.prompt": "minimal", **overrides})
    torch.manual_seed(0)
    model, backbone = build_model(cfg, resolve_config_backbone(cfg))
    encoder, collate = build_features(cfg, backbone.tokenizer, backbone.kind)
    examples = contract.read_table(contract.examples_dir(tiny_data, split)).slice(0, 8)
    return cfg, model, collate(encoder.encode(examples.to_pydict(), negatives_per_example=4))


def test_history_positions_tell_the_order_of_the_history(tiny_data):
    """The authors' encoders see the history as a set: reversing it changes no score. With
    model.history_positions the model starts as theirs (zero embeddings) and, once the
    embeddings leave zero, tells the latest item from the oldest."""
    from gensr_ray.model.gensr import recency

    assert recency(torch.tensor([[True, True, True, False]])).tolist() == [[2, 1, 0, 0]]
    scores = {}
    for positions in (False, True):
        _, model, batch = _seeded_model_and_batch(tiny_data, "test",
                                                  {"model.history_positions": positions})
        model.eval()
        assert (batch["hist_mask"].sum(1) > 1).any()
        with torch.no_grad():
            scores[positions] = model(batch)["logits"]
            reversed_ = model(_reversed_histories(batch))["logits"]
            torch.testing.assert_close(reversed_, scores[positions], rtol=1e-5, atol=1e-6)
            if positions:
                torch.nn.init.normal_(model.cf_positions.weight, std=0.5)
                torch.nn.init.normal_(model.sem_positions.weight, std=0.5)
                assert not torch.allclose(model(_reversed_histories(batch))["logits"],
                                          model(batch)["logits"], atol=1e-4)
    torch.testing.assert_close(scores[True], scores[False])  # zero embeddings: the same model


def test_cf_layers_stack_on_the_authors_layer(tiny_data):
    """model.cf_layers=3 runs the authors' layer and two more, each of which trains; the
    1-layer model's parameter names are kept, so its checkpoints load as before."""
    from gensr_ray.model.gensr import gensr_loss

    names = {}
    for layers in (1, 3):
        cfg, model, batch = _seeded_model_and_batch(tiny_data, "train",
                                                    {"model.cf_layers": layers})
        names[layers] = {name for name, _ in model.named_parameters()}
    assert len(model.cf_encoder_more) == 2 and names[1] < names[3]
    assert all(n.startswith("cf_encoder_more.") for n in names[3] - names[1])
    loss, _ = gensr_loss(model(batch), batch["label"], cfg.loss, cfg.model)
    loss.backward()
    for layer in model.cf_encoder_more:
        assert layer.qkv.weight.grad is not None and layer.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="model.cf_layers"):
        apply_overrides(GenSRConfig(), {"model.cf_layers": 0})


def test_popularity_buckets_double_with_the_train_count(tiny_data):
    from gensr_ray.assemble import build_model, resolve_config_backbone
    from gensr_ray.data import contract
    from gensr_ray.model.gensr import POPULARITY_BUCKETS

    assert popularity_buckets(torch.tensor([0, 1, 2, 3, 4, 7, 8, 10**9])).tolist() == [
        0, 1, 1, 2, 2, 3, 3, POPULARITY_BUCKETS - 1]
    cfg = apply_overrides(GenSRConfig(), {"data.path": str(tiny_data),
                                          "model.backbone": "preset:tiny-llama",
                                          "model.item_popularity": True})
    model, _ = build_model(cfg, resolve_config_backbone(cfg))
    counts = contract.train_item_counts(tiny_data, model.cf_items.shape[0])
    assert model.item_counts.tolist() == counts.tolist() and counts.sum() > 0


# each per-item switch of the CF view: (its module, the rows an item reaches in it)
_ITEM_SWITCHES = {
    "model.cf_item_offsets": ("cf_offsets", lambda model, items: items),
    "model.item_popularity": ("popularity",
                              lambda model, items: popularity_buckets(model.item_counts[items])),
}


@pytest.mark.parametrize("switch", list(_ITEM_SWITCHES))
def test_per_item_cf_switches_start_from_the_frozen_table_and_learn_from_the_batch(tiny_data,
                                                                                   switch):
    """model.cf_item_offsets (a vector per item) and model.item_popularity (a vector per
    popularity bucket): zero at first they give the model without them; the loss reaches the
    rows of the batch's items (history and candidates) and no other."""
    from gensr_ray.model.gensr import gensr_loss

    logits = {}
    for on in (False, True):
        cfg, model, batch = _seeded_model_and_batch(tiny_data, "train", {switch: on})
        out = model(batch)
        logits[on] = out["logits"].detach()
    loss, _ = gensr_loss(out, batch["label"], cfg.loss, cfg.model)
    loss.backward()
    name, rows = _ITEM_SWITCHES[switch]
    table = getattr(model, name)
    items = torch.cat([batch["target_item"], batch["hist_items"][batch["hist_mask"]]])
    touched = torch.zeros(table.num_embeddings, dtype=torch.bool)
    touched[rows(model, items)] = True
    moved = table.weight.grad.abs().sum(1) > 0
    assert moved.any() and not (moved & ~touched).any()
    torch.testing.assert_close(logits[True], logits[False])


def test_scoring_batches_each_task_s_examples_when_the_tasks_alternate(tiny_data):
    """score_candidates groups a batch's examples by task, so alternating tasks still fill the
    forwards (one forward per example otherwise), and each example keeps its own scores."""
    from gensr_ray.assemble import build_model, resolve_config_backbone
    from gensr_ray.data import contract
    from gensr_ray.eval.gensr_scorer import score_candidates
    from gensr_ray.inputs.build import build_features

    cfg = apply_overrides(GenSRConfig(), {
        "data.path": str(tiny_data), "model.backbone": "preset:tiny-llama",
        "model.prompt": "title_text"})
    model, backbone = build_model(cfg, resolve_config_backbone(cfg))
    model.eval()
    encoder, collate = build_features(cfg, backbone.tokenizer, backbone.kind)
    test = contract.read_table(contract.examples_dir(tiny_data, "test")).to_pydict()
    by_task = {t: [i for i, x in enumerate(test["task"]) if x == t] for t in ("search", "rec")}
    order = [i for pair in zip(by_task["search"][:4], by_task["rec"][:4]) for i in pair]
    assert len(order) == 8  # search, rec, search, rec, ...
    batch = {k: [test[k][i] for i in order] for k in ("task", "history", "query")}
    candidates = np.array([[test["target"][i]] + test["negatives"][i][:9] for i in order])

    forwards = []

    def forward(inputs):
        forwards.append(len(inputs["target_item"]))
        return model(inputs)

    with torch.no_grad():
        together = score_candidates(forward, "decoder", encoder, collate, batch, candidates,
                                    batch_size=40, to_device=lambda b: b)
        assert forwards == [40, 40]  # 4 examples x 10 candidates, one forward per task
        # each example alone, without score_candidates: its row must hold its own scores
        for row, i in enumerate(order):
            group = encoder.encode_group(test["task"][i], test["history"][i], test["query"][i],
                                         candidates[row].tolist())
            alone = answer_score(model.score_group(collate.group(group))).numpy()
            np.testing.assert_allclose(together[row], alone, rtol=1e-4, atol=1e-5)


def test_task_chunks_take_the_tasks_in_a_fixed_order_whatever_comes_first():
    from gensr_ray.eval.gensr_scorer import task_chunks

    def chunks(tasks, size):
        return [c.tolist() for c in task_chunks(tasks, size)]

    # search first, each task's examples in order, split at `size`
    assert chunks(["rec", "search", "search", "rec", "search"], 2) == [[1, 2], [4], [0, 3]]
    assert chunks(["search", "rec", "search", "rec", "search"], 2) == [[0, 2], [4], [1, 3]]
    assert chunks(["rec", "rec"], 5) == [[0, 1]]
    assert chunks([], 3) == []
