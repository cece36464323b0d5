"""Write tiny prepared datasets that follow gensr_ray.data.contract, for tests.

Callers list interactions with their split; examples (history, negatives) are derived here the
way docs/datasets.md describes, so that tests control exactly which item is each example's target.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gensr_ray.data import contract

# (user_id, item_id, task, query or None, timestamp, split)
Interaction = tuple[int, int, str, "str | None", int, str]


def _write(directory: Path, rows: list[dict], schema: pa.Schema) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, directory / "part-00000.parquet")


def write_dataset(
    root: Path,
    items_text: list[str],
    n_users: int,
    interactions: list[Interaction],
    num_negatives: dict[str, int] | None = None,
    seed: int = 0,
) -> Path:
    """Write meta.json, items, users, interactions and examples/{train,valid,test} under root.

    num_negatives: negatives per example by split (default train 2, valid/test 5); drawn among
    items the user never touched, so the catalogue must leave enough of them.
    """
    root = Path(root)
    num_negatives = num_negatives or {"train": 2, "valid": 5, "test": 5}
    rng = np.random.default_rng(seed)
    n_items = len(items_text)
    split_rank = {s: i for i, s in enumerate(contract.SPLITS)}
    ordered = sorted(interactions, key=lambda r: (r[0], r[4]))

    _write(
        contract.items_dir(root),
        [{"item_id": i, "raw_id": f"i{i}", "title": f"item {i}", "text": t}
         for i, t in enumerate(items_text)],
        contract.ITEMS_SCHEMA,
    )
    _write(
        contract.users_dir(root),
        [{"user_id": u, "raw_id": f"u{u}"} for u in range(n_users)],
        contract.USERS_SCHEMA,
    )
    _write(
        contract.interactions_dir(root),
        [{"user_id": u, "item_id": i, "task": t, "query": q, "timestamp": ts, "split": s}
         for u, i, t, q, ts, s in ordered],
        contract.INTERACTIONS_SCHEMA,
    )

    touched: dict[int, set[int]] = {}
    for u, i, *_ in ordered:
        touched.setdefault(u, set()).add(i)
    examples: dict[str, list[dict]] = {s: [] for s in contract.SPLITS}
    previous: dict[int, list[tuple[int, str]]] = {}
    for example_id, (u, i, task, query, ts, split) in enumerate(ordered):
        before = previous.setdefault(u, [])
        if before:
            history = [item for item, s in before if split_rank[s] <= split_rank[split]]
            pool = np.array(sorted(set(range(n_items)) - touched[u]))
            negatives = rng.choice(pool, size=num_negatives[split], replace=False)
            examples[split].append({
                "example_id": example_id, "user_id": u, "task": task, "query": query,
                "timestamp": ts, "history": history[-contract.MAX_HISTORY:], "target": i,
                "negatives": negatives.tolist(),
            })
        before.append((i, split))
    for split, rows in examples.items():
        _write(contract.examples_dir(root, split), rows, contract.EXAMPLES_SCHEMA)

    meta = {
        "schema_version": contract.SCHEMA_VERSION,
        "source": "tests/helpers.py",
        "seed": seed,
        "counts": {
            "users": n_users,
            "items": n_items,
            "interactions": len(ordered),
            "examples": {s: len(rows) for s, rows in examples.items()},
        },
    }
    (root / "meta.json").write_text(json.dumps(meta, indent=2))
    return root
