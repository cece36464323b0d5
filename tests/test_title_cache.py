"""Item titles tokenised once per node: the cached tables equal tokenising each title, later
processes memory-map them, and a changed catalogue or a damaged cache is never read as valid."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gensr_ray.config import GenSRConfig, apply_overrides
from gensr_ray.data import contract
from gensr_ray.inputs.title_cache import cached_item_tokens

LENGTHS = (6, 4, 3)  # prompt, semantic view, target title tokens

TITLES = [
    "Toy Story (1995)",
    "",  # an empty title
    None,  # a missing one
    "Amélie — Le Fabuleux Destin d'Amélie Poulain (2001)",  # non-ASCII
    " ".join(["very long title"] * 400),  # far past every length
    "GoldenEye",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tiny Llama preset's tokenizer, its vocabulary built from a small synthetic set."""
    from gensr_ray.assemble import resolve_config_backbone
    from gensr_ray.data.synthetic import SyntheticOptions, generate_synthetic
    from gensr_ray.data.writer import write_dataset
    from gensr_ray.model.backbone import load_tokenizer

    data = tmp_path_factory.mktemp("vocabulary") / "data"
    write_dataset(generate_synthetic(SyntheticOptions(seed=0, n_users=20, n_items=60,
                                                      events_per_user=6)), data)
    cfg = apply_overrides(GenSRConfig(), {"data.path": str(data),
                                          "model.backbone": "preset:tiny-llama"})
    return load_tokenizer(resolve_config_backbone(cfg))


def _catalogue(root: Path, titles: list[str | None]) -> Path:
    directory = contract.items_dir(root)
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(
        [{"item_id": i, "raw_id": f"i{i}", "title": t, "text": t or ""}
         for i, t in enumerate(titles)], schema=contract.ITEMS_SCHEMA),
        directory / "part-00000.parquet")
    return root


def _expected(tokenizer, title: str | None, length: int) -> tuple[list[int], int]:
    ids = tokenizer.encode(title or "", add_special_tokens=False)[:length]
    kept = ids or [tokenizer.pad_token_id]
    return kept + [tokenizer.pad_token_id] * (length - len(kept)), len(kept)


def test_cached_tables_equal_tokenising_each_title(tokenizer, tmp_path):
    root = _catalogue(tmp_path / "data", TITLES)
    prompt_len, sem_len, target_len = LENGTHS
    tables = cached_item_tokens(root, tokenizer, *LENGTHS)
    assert len(tables.prompt) == len(TITLES)
    for i, title in enumerate(TITLES):
        ids = tokenizer.encode(title or "", add_special_tokens=False)
        assert tables.prompt[i] == ids[:prompt_len], title
        for table, lens, length in ((tables.sem, tables.sem_len, sem_len),
                                    (tables.target, tables.target_len, target_len)):
            row, n = _expected(tokenizer, title, length)
            assert table[i].tolist() == row and lens[i] == n, (title, length)
    assert tables.prompt[4] and len(tables.prompt[4]) == prompt_len  # the long title, cut


def test_a_later_process_maps_the_files_and_a_changed_catalogue_is_tokenised_again(
        tokenizer, tmp_path):
    root = _catalogue(tmp_path / "data", TITLES)
    first = cached_item_tokens(root, tokenizer, *LENGTHS)
    again = cached_item_tokens(root, tokenizer, *LENGTHS)
    assert isinstance(again.sem, np.memmap) and isinstance(again.prompt.values, np.memmap)
    assert np.array_equal(first.sem, again.sem)
    assert Path(again.sem.filename).parent == Path(first.sem.filename).parent

    time.sleep(0.01)  # a rewrite the same size differs in its modification time
    _catalogue(root, ["GoldenEye"] + TITLES[1:])
    changed = cached_item_tokens(root, tokenizer, *LENGTHS)
    assert changed.prompt[0] == tokenizer.encode("GoldenEye", add_special_tokens=False)
    assert Path(changed.sem.filename).parent != Path(first.sem.filename).parent
    # other lengths are other tables
    longer = cached_item_tokens(root, tokenizer, 8, 4, 3)
    assert longer.prompt[4] == tokenizer.encode(TITLES[4], add_special_tokens=False)[:8]


def test_a_damaged_cache_is_rebuilt_or_refused_never_unpickled(tokenizer, tmp_path):
    root = _catalogue(tmp_path / "data", TITLES)
    tables = cached_item_tokens(root, tokenizer, *LENGTHS)
    directory = Path(tables.sem.filename).parent
    os.unlink(directory / "target.npy")  # a file lost: the tables are built again
    rebuilt = cached_item_tokens(root, tokenizer, *LENGTHS)
    assert np.array_equal(rebuilt.target, tables.target)

    # an object array (a pickle) planted in place of a table: refused by name, not loaded
    np.save(directory / "sem.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(contract.DataError, match=r"sem\.npy: not a plain token table"):
        cached_item_tokens(root, tokenizer, *LENGTHS)


def test_no_items_shards_is_a_data_error(tokenizer, tmp_path):
    contract.items_dir(tmp_path).mkdir(parents=True)
    with pytest.raises(contract.DataError, match="no part-\\*.parquet shards"):
        cached_item_tokens(tmp_path, tokenizer, *LENGTHS)
