"""From stored examples to model inputs, on the CPU side of the pipeline.

`ExampleEncoder` expands each example into pointwise rows (the target with label 1, each
negative with label 0; or any given candidates at evaluation) and writes each row's prompt as
token ids with soft-token slots. `Collator` pads a batch of rows into tensors and looks up the
history and candidate titles for the semantic view. Both are plain Python/numpy, used by Ray
Data tasks in training and directly in evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gensr_ray.data.contract import TASK_IDS
from gensr_ray.inputs.prompts import PromptAssembler


class RaggedIds:
    """Token id lists of varying length, stored flat: item i's ids are
    values[offsets[i]:offsets[i + 1]]. Indexing gives a Python list."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray):
        self.values = values
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> list[int]:
        return self.values[self.offsets[i]:self.offsets[i + 1]].tolist()


@dataclass
class ItemTokens:
    """Per-item title tokens (rows indexed by item id); built and cached by
    gensr_ray.inputs.title_cache, usually memory-mapped."""

    prompt: RaggedIds  # for titles written into the prompt, cut to the prompt title length
    sem: np.ndarray  # [n_items, title_tokens] for the semantic history view
    sem_len: np.ndarray
    target: np.ndarray  # [n_items, target_title_tokens] for the candidate's mean embedding
    target_len: np.ndarray


class ExampleEncoder:
    """Examples (columnar dict) -> pointwise rows (columnar dict of lists)."""

    def __init__(self, tokenizer, items: ItemTokens, design: str, query_in_prompt: bool,
                 append_eos: bool, item_noun: str = "item", item_plural: str = "",
                 splice_bug: bool = False):
        self.assembler = PromptAssembler(tokenizer, design, items.prompt, query_in_prompt,
                                         append_eos, item_noun, item_plural, splice_bug)

    def encode(self, examples: dict, candidates: np.ndarray | None = None,
               negatives_per_example: int | None = None) -> dict[str, list]:
        """Rows for every (example, candidate). Without `candidates`: target + negatives."""
        rows: dict[str, list] = {k: [] for k in (
            "example_id", "task", "history", "target", "label", "prompt_ids", "prompt_slots")}
        for i in range(len(examples["target"])):
            history = [int(h) for h in examples["history"][i]]
            target = int(examples["target"][i])
            if candidates is not None:
                items = [int(c) for c in candidates[i]]
            else:
                negs = list(examples["negatives"][i])[:negatives_per_example]
                items = [target] + [int(n) for n in negs]
            task = examples["task"][i]
            for item in items:
                prompt = self.assembler.build(task, history, item, examples["query"][i])
                rows["example_id"].append(int(examples["example_id"][i]))
                rows["task"].append(TASK_IDS[task])
                rows["history"].append(history)
                rows["target"].append(item)
                rows["label"].append(1.0 if item == target else 0.0)
                rows["prompt_ids"].append(prompt.ids)
                rows["prompt_slots"].append(prompt.slots)
        return rows


    def encode_group(self, task: str, history: list[int], query: str | None,
                     candidates: list[int]) -> dict:
        """One example's candidates as a shared prefix + one suffix per candidate."""
        prompts = [self.assembler.build(task, history, c, query) for c in candidates]
        cut = prompts[0].prefix_len  # candidate-independent, the same for every candidate
        return {"task": TASK_IDS[task], "history": history, "candidates": candidates,
                "prefix_ids": prompts[0].ids[:cut],
                "suffix_ids": [p.ids[cut:] for p in prompts],
                "suffix_slots": [p.slots[cut:] for p in prompts]}


class Collator:
    """Pads pointwise rows into the tensors `GenSR.forward` reads.

    Prompts are left-padded so the answer position is the last one for every row.
    """

    def __init__(self, items: ItemTokens, pad_id: int):
        self.items = items
        self.pad_id = pad_id

    def group(self, g: dict) -> dict[str, torch.Tensor]:
        """Tensors for `GenSR.score_group` from one example's group."""
        return self.groups([g])

    def groups(self, gs: list[dict]) -> dict[str, torch.Tensor]:
        """Tensors for `GenSR.score_group` from the groups of G examples of one task with C
        candidates each: prefixes left-padded [G, P] (their positions are counted from the
        first real token), histories right-padded [G, H], the G x C suffixes right-padded
        (every real position keeps its true position)."""
        if len({g["task"] for g in gs}) != 1 or len({len(g["candidates"]) for g in gs}) != 1:
            raise ValueError("groups scored together must share the task and candidate count")
        suffixes = [(i, s) for g in gs for i, s in zip(g["suffix_ids"], g["suffix_slots"])]
        width = max(len(i) for i, _ in suffixes)
        ids = np.full((len(suffixes), width), self.pad_id, dtype=np.int64)
        slots = np.zeros((len(suffixes), width), dtype=np.int64)
        mask = np.zeros((len(suffixes), width), dtype=np.int64)
        for r, (s_ids, s_slots) in enumerate(suffixes):
            ids[r, :len(s_ids)] = s_ids
            slots[r, :len(s_slots)] = s_slots
            mask[r, :len(s_ids)] = 1
        prefix_len = max(len(g["prefix_ids"]) for g in gs)
        prefix = np.full((len(gs), prefix_len), self.pad_id, dtype=np.int64)
        prefix_mask = np.zeros((len(gs), prefix_len), dtype=np.int64)
        hist_len = max(1, max(len(g["history"]) for g in gs))
        hist = np.zeros((len(gs), hist_len), dtype=np.int64)
        hist_mask = np.zeros((len(gs), hist_len), dtype=bool)
        for r, g in enumerate(gs):
            if g["prefix_ids"]:
                prefix[r, prefix_len - len(g["prefix_ids"]):] = g["prefix_ids"]
                prefix_mask[r, prefix_len - len(g["prefix_ids"]):] = 1
            hist[r, :len(g["history"])] = g["history"]
            hist_mask[r, :len(g["history"])] = True
        target = np.asarray([c for g in gs for c in g["candidates"]], dtype=np.int64)
        return {
            "task": torch.tensor(gs[0]["task"]),
            "prefix_ids": torch.from_numpy(prefix),
            "prefix_mask": torch.from_numpy(prefix_mask),
            **self._item_tensors(hist, hist_mask, target),
            "suffix_ids": torch.from_numpy(ids),
            "suffix_slots": torch.from_numpy(slots),
            "suffix_mask": torch.from_numpy(mask),
        }

    def _item_tensors(self, hist: np.ndarray, hist_mask: np.ndarray,
                      target: np.ndarray) -> dict[str, torch.Tensor]:
        """The views' inputs: histories [n, H] with their title tokens [n, H, Lt], and the
        targets [m] with theirs [m, Lt'] (cut to the longest target title)."""
        sem = self.items.sem[hist].astype(np.int64)
        sem_mask = (np.arange(sem.shape[-1]) < self.items.sem_len[hist][..., None]) & \
            hist_mask[..., None]
        tgt_len = self.items.target_len[target]
        tgt = self.items.target[target][:, :max(1, int(tgt_len.max()))].astype(np.int64)
        return {
            "hist_items": torch.from_numpy(hist),
            "hist_mask": torch.from_numpy(hist_mask),
            "hist_title_ids": torch.from_numpy(sem),
            "hist_title_mask": torch.from_numpy(sem_mask),
            "target_item": torch.from_numpy(target),
            "target_title_ids": torch.from_numpy(np.ascontiguousarray(tgt)),
            "target_title_mask": torch.from_numpy(np.arange(tgt.shape[1]) < tgt_len[:, None]),
        }

    def __call__(self, rows: dict) -> dict[str, torch.Tensor]:
        n = len(rows["target"])
        prompt_len = max(len(p) for p in rows["prompt_ids"])
        ids = np.full((n, prompt_len), self.pad_id, dtype=np.int64)
        slots = np.zeros((n, prompt_len), dtype=np.int64)
        mask = np.zeros((n, prompt_len), dtype=np.int64)
        hist_len = max(1, max(len(h) for h in rows["history"]))
        hist = np.zeros((n, hist_len), dtype=np.int64)
        hist_mask = np.zeros((n, hist_len), dtype=bool)
        for r in range(n):
            p = rows["prompt_ids"][r]
            ids[r, prompt_len - len(p):] = p
            slots[r, prompt_len - len(p):] = rows["prompt_slots"][r]
            mask[r, prompt_len - len(p):] = 1
            h = rows["history"][r]
            hist[r, :len(h)] = h
            hist_mask[r, :len(h)] = True
        target = np.asarray(rows["target"], dtype=np.int64)
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask),
            "soft_slots": torch.from_numpy(slots),
            **self._item_tensors(hist, hist_mask, target),
            "label": torch.tensor(np.asarray(rows["label"], dtype=np.float32)),
            "task": torch.tensor(np.asarray(rows["task"], dtype=np.int64)),
            "example_id": torch.tensor(np.asarray(rows["example_id"], dtype=np.int64)),
        }
