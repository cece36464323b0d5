"""`gensr`: the command line. Each subcommand parses its flags and calls one library function.

    gensr prepare --dataset ml100k --out data/ml100k
    gensr pretrain-cf --data data/ml100k
    gensr eval --data data/ml100k --baselines --out results.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


def _prepare(args: argparse.Namespace) -> None:
    from gensr_ray.data.build import WriteOptions, write_dataset

    started = time.perf_counter()
    if args.dataset == "ml100k":
        from gensr_ray.data.movielens import SEARCH_FRACTION, load_ml100k

        fraction = SEARCH_FRACTION if args.search_fraction is None else args.search_fraction
        raw = load_ml100k(args.source, seed=args.seed, search_fraction=fraction)
    else:
        from gensr_ray.data.synthetic import generate_synthetic

        kwargs = {} if args.search_fraction is None else {"search_fraction": args.search_fraction}
        raw = generate_synthetic(seed=args.seed, **kwargs)

    after_build = None
    if not args.no_cf:
        def after_build(tmp_dir: Path) -> None:
            from gensr_ray.cf.lightgcn import LightGCNConfig, save_cf, train_lightgcn
            from gensr_ray.data.contract import cf_path

            t0 = time.perf_counter()
            save_cf(train_lightgcn(tmp_dir, LightGCNConfig(seed=args.seed)), cf_path(tmp_dir))
            print(f"LightGCN pretrained on the training split in {time.perf_counter() - t0:.1f}s")

    opts = WriteOptions(seed=args.seed, rows_per_shard=args.rows_per_shard,
                        overwrite=args.overwrite)
    meta = write_dataset(raw, args.out, opts, after_build=after_build)
    counts = meta["counts"]
    print(f"prepared {args.dataset} in {args.out} ({time.perf_counter() - started:.1f}s): "
          f"{counts['users']} users, {counts['items']} items, "
          f"{counts['interactions']['search']} search / {counts['interactions']['rec']} rec events")
    for split, by_task in counts["examples"].items():
        print(f"  {split:5s} examples: search {by_task['search']:6d}  rec {by_task['rec']:6d}")


def _pretrain_cf(args: argparse.Namespace) -> None:
    from gensr_ray.cf.lightgcn import LightGCNConfig, save_cf, train_lightgcn
    from gensr_ray.data.contract import cf_path, read_meta

    read_meta(args.data)
    config = LightGCNConfig(seed=args.seed, **({"epochs": args.epochs} if args.epochs else {}))
    started = time.perf_counter()
    save_cf(train_lightgcn(args.data, config), cf_path(args.data))
    print(f"LightGCN tables written to {cf_path(args.data)} ({time.perf_counter() - started:.1f}s)")


def _eval(args: argparse.Namespace) -> None:
    from gensr_ray.data.contract import read_meta
    from gensr_ray.eval.harness import build_baselines, evaluate, format_table, write_results

    if not args.baselines:
        raise SystemExit("gensr eval: nothing to evaluate; pass --baselines")
    read_meta(args.data)
    started = time.perf_counter()
    results = evaluate(args.data, args.split, build_baselines(args.data))
    print(format_table(results))
    if args.out:
        write_results(results, args.out)
        print(f"results written to {args.out} ({time.perf_counter() - started:.1f}s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gensr", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="build a dataset in the on-disk contract")
    p.add_argument("--dataset", choices=["ml100k", "synthetic"], required=True)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--source", type=Path, default=None,
                   help="ml100k: local recbole-1.2.1 wheel or ml-100k directory (default: "
                        "download the wheel into $GENSR_CACHE)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--search-fraction", type=float, default=None,
                   help="share of each user's positives that become search events")
    p.add_argument("--rows-per-shard", type=int, default=8192)
    p.add_argument("--no-cf", action="store_true", help="skip LightGCN pretraining")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("pretrain-cf", help="(re)train the LightGCN tables of a dataset")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(func=_pretrain_cf)

    p = sub.add_parser("eval", help="evaluate baselines (and later checkpoints) on a split")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--baselines", action="store_true",
                   help="popularity, LightGCN and BM25 in the same harness")
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p.add_argument("--out", type=Path, default=None, help="results JSON")
    p.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from gensr_ray.data.contract import DataError

    try:
        args.func(args)
    except (DataError, FileExistsError) as exc:
        print(f"gensr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
