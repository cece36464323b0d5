"""Peak memory and wall time of `write_dataset` on a large KuaiSAR-shaped RawDataset, against
building that RawDataset alone; each runs in a fresh subprocess, in the same run.

    python bench/prepare_memory.py                                  # 50k users, 2M events
    python bench/prepare_memory.py --users 5000 --events 200000     # a quick one
    python bench/prepare_memory.py --from-csv                       # through load_kuaisar
    python bench/prepare_memory.py --other-checkout /tmp/old        # also another version's writer

The RawDataset is what the KuaiSAR loader hands to the writer (one string object per id,
shared query and task strings, integer ms timestamps), generated directly so that only the
writer is measured; `--from-csv` writes the same events as KuaiSAR's CSVs instead and measures
`gensr prepare`'s path (loader, then writer) against the loader alone. Peak RSS is the child's
own `ru_maxrss`. With `--other-checkout DIR` (e.g. `git worktree add DIR <commit>`), that
checkout's code runs on the same data and the two outputs are compared file by file. Prints
last `ratio=<peak RSS with the writer / baseline peak RSS>` (1.0 = writing needs nothing beyond
its input).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


ITEM_ID_BASE = 5_000_000  # item i is 5_000_000 + 7 i, ids as sparse as the release's


def draw_events(args: argparse.Namespace) -> dict:
    """The generated events: popular items drawn more often, ms timestamps over 30 days."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    n = args.events
    return {
        "item_words": rng.integers(0, 30_000, size=(args.items, 6)),
        "query_words": rng.integers(0, 30_000, size=(args.queries, 3)),
        "users": rng.integers(0, args.users, size=n),
        "items": np.minimum((args.items * rng.random(n) ** 2).astype(np.int64), args.items - 1),
        "search": rng.random(n) < args.search_share,
        "queries": rng.integers(0, args.queries, size=n),
        "stamps": 1_684_000_000_000 + rng.integers(0, 30 * 86_400_000, size=n),
    }


def raw_dataset(args: argparse.Namespace):
    """A RawDataset shaped like load_kuaisar's output (one string object per id, as it makes
    them; query strings shared between events of the same query)."""
    from gensr_ray.data.writer import RawDataset

    ev = draw_events(args)
    titles = [f"Funny / Funny joke | {' '.join(f'w{w}' for w in ws)}"
              for ws in ev["item_words"].tolist()]
    query_pool = [" ".join(f"w{w}" for w in ws) for ws in ev["query_words"].tolist()]
    search = ev["search"].tolist()
    return RawDataset(
        source=f"KuaiSAR-shaped benchmark data (seed {args.seed})",
        items_file="<bench items>", interactions_file="<bench interactions>",
        item_ids=[str(ITEM_ID_BASE + 7 * i) for i in range(args.items)], titles=titles,
        texts=[f"{t} | 搞笑 / 搞笑段子" for t in titles],
        user_ids=[str(u) for u in ev["users"].tolist()],
        inter_item_ids=[str(ITEM_ID_BASE + 7 * i) for i in ev["items"].tolist()],
        tasks=["search" if s else "rec" for s in search],
        queries=[query_pool[q] if s else None for q, s in zip(ev["queries"].tolist(), search)],
        timestamps=ev["stamps"].tolist(),
    )


def write_csvs(args: argparse.Namespace, root: Path) -> None:
    """The same events as KuaiSAR's three CSVs (the columns the loader reads; every row a click)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    ev = draw_events(args)
    root.mkdir(parents=True)
    rec, src = ~ev["search"], ev["search"]
    pacsv.write_csv(pa.table({
        "user_id": ev["users"][rec], "item_id": ITEM_ID_BASE + 7 * ev["items"][rec],
        "timestamp": ev["stamps"][rec].astype(float), "click": [1] * int(rec.sum())}),
        root / "rec_inter.csv")
    keywords = [f"[{a}, {b}, {c}]" for a, b, c in ev["query_words"].tolist()]
    pacsv.write_csv(pa.table({
        "user_id": ev["users"][src], "search_session_id": range(int(src.sum())),
        "search_session_timestamp": ev["stamps"][src].astype(float),
        "keyword": [keywords[q] for q in ev["queries"][src].tolist()],
        "item_id": ITEM_ID_BASE + 7 * ev["items"][src], "click_cnt": [1] * int(src.sum())}),
        root / "src_inter.csv")
    pacsv.write_csv(pa.table({
        "item_id": [ITEM_ID_BASE + 7 * i for i in range(args.items)],
        "caption": [f"[{', '.join(map(str, ws))}]" for ws in ev["item_words"].tolist()],
        "first_level_category_name": ["搞笑"] * args.items,
        "first_level_category_name_en": ["Funny"] * args.items}), root / "item_features.csv")


def child(args: argparse.Namespace) -> None:
    """Build the RawDataset (and write it when --out is given); print one JSON line."""
    sys.path.insert(0, args.code)
    import gensr_ray
    from gensr_ray.data.writer import WriteOptions, write_dataset

    if args.write_csv:
        write_csvs(args, Path(args.write_csv))
        return
    t0 = time.perf_counter()
    if args.csv:
        from gensr_ray.data.kuaisar import KuaiSAROptions, load_kuaisar

        raw = load_kuaisar(KuaiSAROptions(Path(args.csv)))
    else:
        raw = raw_dataset(args)
    report = {"code": str(Path(gensr_ray.__file__).parent.parent),
              "build_s": time.perf_counter() - t0, "events": len(raw.user_ids)}
    if args.out:
        t0 = time.perf_counter()
        meta = write_dataset(raw, Path(args.out), WriteOptions(rows_per_shard=args.rows_per_shard))
        report["write_s"] = time.perf_counter() - t0
        report["examples"] = sum(sum(t.values()) for t in meta["counts"]["examples"].values())
    report["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(report))


def run_child(args: argparse.Namespace, code: Path, *extra: str) -> dict:
    """This script in a fresh interpreter importing gensr_ray from `code` (the parent stays
    small: a child's ru_maxrss can include the RSS of the process it was started from)."""
    command = [sys.executable, __file__, "--child", "--code", str(code),
               "--users", str(args.users), "--events", str(args.events),
               "--items", str(args.items), "--queries", str(args.queries),
               "--search-share", str(args.search_share), "--seed", str(args.seed),
               "--rows-per-shard", str(args.rows_per_shard), *extra]
    t0 = time.perf_counter()
    done = subprocess.run(command, check=False, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(code)})
    if done.returncode != 0:
        sys.exit(f"child failed ({code}):\n{done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if lines else {}
    report["wall_s"] = time.perf_counter() - t0
    return report


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=100_000, help="distinct queries")
    parser.add_argument("--search-share", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows-per-shard", type=int, default=8192)
    parser.add_argument("--from-csv", action="store_true",
                        help="write the events as KuaiSAR CSVs and load them with load_kuaisar "
                             "(baseline: the loader alone)")
    parser.add_argument("--other-checkout", type=Path, default=None,
                        help="also run the writer of this checkout (e.g. a git worktree)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code", default=str(ROOT), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--csv", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--write-csv", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    print(f"KuaiSAR-shaped data: {args.users} users, {args.events} events, {args.items} items, "
          f"{args.queries} distinct queries, search share {args.search_share:.0%}, "
          f"{args.rows_per_shard} rows per shard")
    tmp = Path(tempfile.mkdtemp(prefix="gensr-bench-prepare-"))
    try:
        source: tuple[str, ...] = ()
        what = "build the RawDataset"
        if args.from_csv:
            run_child(args, ROOT, "--write-csv", str(tmp / "csv"))
            size = sum(p.stat().st_size for p in (tmp / "csv").iterdir())
            print(f"KuaiSAR CSVs: {size / 2**20:.0f} MB")
            source = ("--csv", str(tmp / "csv"))
            what = "load_kuaisar"
        base = run_child(args, ROOT, *source)
        print(f"baseline: {what} ({base['events']} events): peak RSS {base['peak_mb']:.0f} MB, "
              f"{base['wall_s']:.1f} s")
        runs = [("this checkout", ROOT)]
        if args.other_checkout:
            runs.append((str(args.other_checkout), args.other_checkout.resolve()))
        outputs, peaks = [], []
        for label, code in runs:
            out = tmp / f"out{len(outputs)}"
            r = run_child(args, code, *source, "--out", str(out))
            outputs.append(out)
            peaks.append(r["peak_mb"])
            extra = r["peak_mb"] - base["peak_mb"]
            print(f"{what} + write_dataset ({label}): peak RSS {r['peak_mb']:.0f} MB, "
                  f"{r['wall_s']:.1f} s (write {r['write_s']:.1f} s, {r['examples']} examples); "
                  f"over the baseline {extra:.0f} MB = {extra * 2**20 / r['events']:.0f} B/event")
        if len(outputs) == 2:
            a, b = (file_hashes(o) for o in outputs)
            print(f"outputs byte-identical: {'yes' if a == b else 'NO'} ({len(a)} files)")
        print(f"ratio={peaks[0] / base['peak_mb']:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
