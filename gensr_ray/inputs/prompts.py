"""Prompt designs, chosen by name in config, and their assembly into token ids + soft slots.

A template is text with two kinds of placeholders:
- text: {history_titles}, {target_title}, {query} — written into the prompt as tokens;
- soft: <CF_HIST>, <SEM_HIST>, <CF_TARGET>, <TITLE_EMB> — one position each, whose input
  embedding the model replaces with the CF history vector, the semantic history vector, the
  candidate's projected CF vector and the candidate's mean title embedding.

Assembly works on pre-tokenized pieces (static template text, item titles, the query), so a
row costs a few list concatenations: it runs on the CPU side of the data pipeline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gensr_ray.config import PROMPT_DESIGNS

SOFT_TOKENS = ("<CF_HIST>", "<SEM_HIST>", "<CF_TARGET>", "<TITLE_EMB>")  # slots 1..4
TEXT_FIELDS = ("{history_titles}", "{target_title}", "{query}")
BLIND_QUERY = "<Query>"  # what query-blind search prompts show (the authors' bug)
# {item} and {items} stand for the dataset's item noun (data.item_noun: "book" on Kindle,
# "movie" on MovieLens), filled in before a template is split.

# The authors' template (get_prompt in their UnifyDataset.py), whitespace runs made single
# spaces; their placeholders <ItemTitleList>, <ItemFeatureList>, <TargetItemTitle>,
# <TargetItemID> are, in their model, the CF history, the semantic history, the candidate's CF
# vector and the candidate's mean title embedding: no title text reaches the model.
_AUTHORS_ASK = ("### Question: A user has given high ratings to the following {items}: "
                "<CF_HIST>. The semantic features of these {items} are <SEM_HIST>. Using all "
                "available information, make a prediction about whether the user would enjoy "
                "the {item} <CF_TARGET> with the semantic feature <TITLE_EMB>")
_AUTHORS_END = '? Answer with "Yes" or "No". #Answer:'

_HEAD = ("A user has given high ratings to the following {items}: {history_titles}. "
         "The semantic features of these {items} are <SEM_HIST>, and their collaborative "
         "features are <CF_HIST>. ")
_ITEM = ("the {item} {target_title} with the semantic feature <TITLE_EMB> and the "
         "collaborative feature <CF_TARGET>")
_ANSWER = ' Answer with "Yes" or "No". Answer:'
# title_text: the history titles and the question first, every candidate-dependent piece
# (the title, and the four soft vectors: both history vectors attend to the candidate) in
# the last few tokens, so that one example's candidates share all the rest of the prompt
_TITLES = "A user has given high ratings to the following {items}: {history_titles}. "
_LAST = (' Answer with "Yes" or "No". The next {item}, then the semantic and collaborative '
         "features of it and of the history: {target_title} <TITLE_EMB> <CF_TARGET> "
         "<SEM_HIST> <CF_HIST>. Answer:")

PROMPTS: dict[str, dict[str, str]] = {
    # The authors' input exactly: their wording, the four vectors in their places, no titles.
    "authors": {
        "rec": _AUTHORS_ASK + _AUTHORS_END,
        "search": _AUTHORS_ASK + " based on the query {query}" + _AUTHORS_END,
    },
    # Our variant: the authors' wording with the history titles and the candidate's title
    # written as text (an LLM reads titles), the question before the candidate so that all
    # the candidate changes (its title, the four soft vectors) is the prompt's end.
    "title_text": {
        "rec": _TITLES + "Would the user enjoy the next {item}?" + _LAST,
        "search": _TITLES + 'Based on the query "{query}", would the user enjoy the next {item}?'
                  + _LAST,
    },
    # title_text's words with each soft token beside what it describes: the question comes
    # after the history vectors, so ~45 tokens differ per candidate in scoring, not ~15.
    "title_text_inline": {
        "rec": _HEAD + "Would the user enjoy " + _ITEM + "?" + _ANSWER,
        "search": _HEAD + 'Based on the query "{query}", would the user enjoy ' + _ITEM + "?"
                  + _ANSWER,
    },
    # No history titles: shorter, the views carry the history.
    "no_history_titles": {
        "rec": "A user's history has semantic features <SEM_HIST> and collaborative features "
               "<CF_HIST>. Would the user enjoy " + _ITEM + "?" + _ANSWER,
        "search": "A user's history has semantic features <SEM_HIST> and collaborative "
                  'features <CF_HIST>. Based on the query "{query}", would the user enjoy '
                  + _ITEM + "?" + _ANSWER,
    },
    # Text only: titles and query, no soft tokens (the views are unused).
    "no_soft_tokens": {
        "rec": "A user has given high ratings to the following {items}: {history_titles}. "
               "Would the user enjoy the {item} {target_title}?" + _ANSWER,
        "search": "A user has given high ratings to the following {items}: {history_titles}. "
                  'Based on the query "{query}", would the user enjoy the {item} '
                  "{target_title}?" + _ANSWER,
    },
    # As short as it gets: the soft tokens, the candidate title and the query.
    "minimal": {
        "rec": "user <CF_HIST> <SEM_HIST> {item} {target_title} <CF_TARGET> <TITLE_EMB> "
               "enjoy? Answer:",
        "search": "query {query} user <CF_HIST> <SEM_HIST> {item} {target_title} <CF_TARGET> "
                  "<TITLE_EMB> relevant? Answer:",
    },
    # No task instruction, no answer cue: history, query when there is one, candidate (the
    # discriminative twin's input, model.kind=discriminative)
    "task_free": {
        "rec": "user <CF_HIST> <SEM_HIST> {item} {target_title} <CF_TARGET> <TITLE_EMB>",
        "search": "query {query} user <CF_HIST> <SEM_HIST> {item} {target_title} <CF_TARGET> "
                  "<TITLE_EMB>",
    },
}
DESCRIPTIONS = {
    "authors": "the authors' template exactly: four soft vectors at its four placeholders, no "
               "title text (model.authors_splice_bug reproduces their splice)",
    "title_text": "the authors' wording plus the history titles and the candidate title as "
                  "text; the candidate and the four soft tokens last (our variant)",
    "title_text_inline": "title_text with each soft token beside what it describes and the "
                         "question after them (~45 tokens per candidate in scoring, not ~15)",
    "no_history_titles": "the history's two soft tokens, then the candidate's title and "
                         "soft tokens: no history titles",
    "no_soft_tokens": "titles and query as text only; the two views are unused",
    "minimal": "a few words around the soft tokens, the candidate title and the query",
    "task_free": "minimal without a question: the same input for both tasks but the query "
                 "(the discriminative twin's)",
}

if tuple(PROMPTS) != PROMPT_DESIGNS or set(DESCRIPTIONS) != set(PROMPTS):
    raise ImportError("gensr_ray.config.PROMPT_DESIGNS must list the designs of PROMPTS, "
                      "each described in DESCRIPTIONS")

_PIECE = re.compile("(" + "|".join(re.escape(p) for p in SOFT_TOKENS + TEXT_FIELDS) + ")")


def template_pieces(design: str, task: str, item_noun: str = "item",
                    item_plural: str = "", splice_bug: bool = False) -> list[str]:
    """The template split into static text and placeholders, in order, the item noun filled
    in. `splice_bug` (authors design only) replaces the text between <SEM_HIST> and
    <CF_TARGET> by what the authors' collator passes there: UnifyCollator.py takes the text
    after <TargetItemTitle> where it means the text before it, so the question's sentence is
    dropped and its end repeated, their last placeholder's name left in as text."""
    if design not in PROMPTS:
        raise ValueError(f"unknown prompt design {design!r}; known: {sorted(PROMPTS)}")
    template = fill_nouns(PROMPTS[design][task], item_noun, item_plural)
    if splice_bug:
        if design != "authors":
            raise ValueError("model.authors_splice_bug applies to model.prompt=authors only")
        before, rest = template.split("<SEM_HIST>")
        after_target = rest.split("<CF_TARGET>")[1]
        template = (before + "<SEM_HIST>" + after_target.replace("<TITLE_EMB>", "<TargetItemID>")
                    + "<CF_TARGET>" + after_target)
    return [p for p in _PIECE.split(template) if p]


def fill_nouns(template: str, item_noun: str, item_plural: str = "") -> str:
    return template.replace("{items}", item_plural or item_noun + "s").replace("{item}",
                                                                            item_noun)


def all_template_text(item_noun: str = "item", item_plural: str = "") -> list[str]:
    """Every template's text (tiny backbones build their vocabulary from it)."""
    return [fill_nouns(t, item_noun, item_plural) for design in PROMPTS.values()
            for t in design.values()] + [BLIND_QUERY, "<TargetItemID>"]


@dataclass
class PromptIds:
    ids: list[int]
    slots: list[int]  # 0 for text, k for SOFT_TOKENS[k - 1]
    # Tokens before the first candidate-dependent piece (a soft token or the target title).
    # Both history vectors depend on the candidate (target attention), so this is the part
    # of the prompt that one example's candidates share.
    prefix_len: int


class PromptAssembler:
    """Builds prompt token ids from pre-tokenized pieces for one design and tokenizer."""

    def __init__(self, tokenizer, design: str, title_ids: list[list[int]],
                 query_in_prompt: bool = True, append_eos: bool = False,
                 item_noun: str = "item", item_plural: str = "", splice_bug: bool = False):
        self.tokenizer = tokenizer
        self.title_ids = title_ids  # per item, already cut to the prompt title length
        self.query_in_prompt = query_in_prompt
        self.eos = [tokenizer.eos_token_id] if append_eos else []
        self.sep = self._encode(", ")
        self.pieces = {}
        for task in ("search", "rec"):
            self.pieces[task] = [
                p if p in SOFT_TOKENS or p in TEXT_FIELDS else self._encode(p)
                for p in template_pieces(design, task, item_noun, item_plural, splice_bug)
            ]


    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def build(self, task: str, history: list[int], target: int, query: str | None) -> PromptIds:
        ids: list[int] = []
        slots: list[int] = []
        prefix_len = None
        for piece in self.pieces[task]:
            if prefix_len is None and (piece in SOFT_TOKENS or piece == "{target_title}"):
                prefix_len = len(ids)
            if isinstance(piece, list):
                part = piece
            elif piece in SOFT_TOKENS:
                ids.append(self.tokenizer.pad_token_id)
                slots.append(SOFT_TOKENS.index(piece) + 1)
                continue
            elif piece == "{history_titles}":
                part = []
                for n, item in enumerate(history):
                    part += (self.sep if n else []) + self.title_ids[item]
            elif piece == "{target_title}":
                part = self.title_ids[target]
            else:  # {query}
                part = self._encode((query or "") if self.query_in_prompt else BLIND_QUERY)
            ids += part
            slots += [0] * len(part)
        ids += self.eos
        slots += [0] * len(self.eos)
        return PromptIds(ids, slots, len(ids) if prefix_len is None else prefix_len)
