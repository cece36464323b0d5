"""What a process pays for the catalogue's title tokens as the catalogue grows: memory-mapped
from the per-node cache (gensr_ray.inputs.title_cache) against tokenising every title itself.

    python bench/title_tokens.py                       # 50k, 200k, 800k items
    python bench/title_tokens.py --items 20000 100000  # quicker

For each size: the one-off build of the cache (tokenise + write), then two fresh processes
that each load the tiny Llama preset's tokenizer, get the title tables (one from the cache,
one by tokenising the catalogue in-process, as every process did before the cache) and read
what 256 training rows need (20 history titles each, the candidate's title, the prompt
titles). Prints each process's time for that and the growth of its anonymous memory (its own
heap; the mapped tables are page cache, shared by every process on the node), the fitted exponent of the cached process's memory against the
catalogue size, and last `ratio=` the in-process / cached time at the largest size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROWS, HISTORY = 256, 20


def _anonymous_mib() -> float:
    """This process's anonymous memory (heap; not file pages, which the page cache shares
    between the processes that map them and can drop), MiB."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no Anonymous line in /proc/self/smaps_rollup")


def _tokenizer(vocabulary_data: str):
    from gensr_ray.assemble import resolve_config_backbone
    from gensr_ray.config import GenSRConfig, apply_overrides
    from gensr_ray.model.backbone import load_tokenizer

    cfg = apply_overrides(GenSRConfig(), {"data.path": vocabulary_data,
                                          "model.backbone": "preset:tiny-llama"})
    return load_tokenizer(resolve_config_backbone(cfg))


def child(mode: str, data: str, vocabulary_data: str) -> None:
    """One process's cost: prints a JSON line {seconds, anon_mib}."""
    from gensr_ray.data import contract
    from gensr_ray.inputs.title_cache import cached_item_tokens, tokenize_titles

    tokenizer = _tokenizer(vocabulary_data)
    tokenizer.encode("warm up", add_special_tokens=False)
    before, start = _anonymous_mib(), time.perf_counter()
    if mode == "cached":
        items = cached_item_tokens(data, tokenizer, 16, 16, 8)
    else:
        titles = contract.read_table(contract.items_dir(Path(data)), ["title"]) \
            .column("title").to_pylist()
        items = tokenize_titles(tokenizer, titles, 16, 16, 8)
    rng = np.random.default_rng(0)
    n = len(items.prompt)
    history = rng.integers(0, n, size=(ROWS, HISTORY))
    candidates = rng.integers(0, n, size=ROWS)
    sem = items.sem[history].astype(np.int64)
    target = items.target[candidates].astype(np.int64)
    prompts = sum(len(items.prompt[int(i)]) for i in history.ravel())
    assert sem.shape == (ROWS, HISTORY, 16) and target.shape == (ROWS, 8) and prompts > 0
    print(json.dumps({"seconds": time.perf_counter() - start, "anon_mib": _anonymous_mib() - before}))


def _run_child(mode: str, data: Path, vocabulary: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(data), str(vocabulary)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _catalogue(root: Path, n: int, words: list[str], rng) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gensr_ray.data import contract

    lengths = rng.integers(2, 9, size=n)
    picks = rng.integers(0, len(words), size=int(lengths.sum()))
    titles, at = [], 0
    for length in lengths:
        titles.append(" ".join(words[w] for w in picks[at:at + length]))
        at += length
    directory = contract.items_dir(root)
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"item_id": pa.array(np.arange(n), pa.int32()),
                             "raw_id": [str(i) for i in range(n)], "title": titles,
                             "text": titles}, schema=contract.ITEMS_SCHEMA),
                   directory / "part-00000.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[50_000, 200_000, 800_000])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    import os

    from gensr_ray.data import contract
    from gensr_ray.data.synthetic import SyntheticOptions, generate_synthetic
    from gensr_ray.data.writer import write_dataset
    from gensr_ray.inputs.title_cache import cached_item_tokens

    work = Path(tempfile.mkdtemp(prefix="title-tokens-"))
    os.environ["GENSR_CACHE"] = str(work / "cache")  # the children inherit it
    vocabulary = work / "vocabulary"
    write_dataset(generate_synthetic(SyntheticOptions(seed=0, n_users=50, n_items=300,
                                                      events_per_user=6)), vocabulary)
    titles = contract.read_table(contract.items_dir(vocabulary), ["title"]).column("title")
    words = sorted({w for t in titles.to_pylist() for w in (t or "").split()})
    tokenizer = _tokenizer(str(vocabulary))
    rng = np.random.default_rng(0)
    sizes, cached_mib = [], []
    print(f"{'items':>9}  {'build s':>8}  {'cached s':>8}  {'cached heap':>11}  "
          f"{'in-process s':>12}  {'in-process heap':>15}")
    for n in args.items:
        data = work / f"items-{n}"
        _catalogue(data, n, words, rng)
        start = time.perf_counter()
        cached_item_tokens(data, tokenizer, 16, 16, 8)
        build = time.perf_counter() - start
        cached, inline = _run_child("cached", data, vocabulary), \
            _run_child("inline", data, vocabulary)
        sizes.append(n)
        cached_mib.append(max(cached["anon_mib"], 0.01))
        last = (cached, inline)
        print(f"{n:>9,d}  {build:>8.2f}  {cached['seconds']:>8.3f}  "
              f"{cached['anon_mib']:>7.1f} MiB   {inline['seconds']:>12.2f}  "
              f"{inline['anon_mib']:>10.1f} MiB", flush=True)
    if len(sizes) > 1:
        exponent = float(np.polyfit(np.log(sizes), np.log(cached_mib), 1)[0])
        print(f"cached process's heap ~ items^{exponent:.2f}")
    cached, inline = last
    print(f"ratio={inline['seconds'] / cached['seconds']:.1f}")


if __name__ == "__main__":
    main()
