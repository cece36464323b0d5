"""`gensr`: the command line. Each subcommand parses its flags and calls one library function.

    gensr prepare --dataset ml100k --out data/ml100k
    gensr prepare --dataset amazon --reviews REVIEWS.json.gz --meta META.json.gz --out DIR
    gensr prepare --dataset kuaisar --data-dir KuaiSAR/ --out DIR
    gensr pretrain-cf --data data/ml100k
    gensr pretrain-sasrec --data data/ml100k
    gensr eval --data data/ml100k --baselines --out results.json
    gensr train --config configs/debug.yaml --out runs/debug [--set train.lr=3e-4 ...]
    gensr eval --checkpoint runs/debug --out results.json [--baselines]
    gensr tune --config configs/debug.yaml --sweep configs/sweeps/prompts.yaml --out runs/sweep
    gensr config show --config configs/demo.yaml [--set train.lr=3e-4 ...]
    gensr config help
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path


def _loader_options(args: argparse.Namespace):
    """The options object of the dataset's loader, from the flags that apply to it."""
    from gensr_ray.data.contract import DataError
    from gensr_ray.prepare import DATASETS

    options = DATASETS[args.dataset]
    fraction = {} if args.search_fraction is None else {"search_fraction": args.search_fraction}
    k_core = {} if args.k_core is None else {"k_core": args.k_core}
    if args.dataset == "ml100k":
        return options(source=args.source, seed=args.seed, **fraction)
    if args.dataset == "synthetic":
        return options(seed=args.seed, **fraction)
    if args.dataset == "amazon":
        if args.reviews is None or args.meta is None:
            raise DataError("--dataset amazon needs --reviews FILE and --meta FILE")
        return options(reviews=args.reviews, meta=args.meta, query_files=args.query_files,
                       seed=args.seed, **fraction, **k_core)
    if args.data_dir is None:
        raise DataError("--dataset kuaisar needs --data-dir DIR (with rec_inter.csv, "
                        "src_inter.csv and item_features.csv)" if args.dataset == "kuaisar"
                        else "--dataset unisar needs --data-dir DIR (the UniSAR authors' "
                        "data/<name> directory, with dataset/{src,rec}_{train,val,test}.pkl)")
    if fraction:
        raise DataError(f"--search-fraction does not apply to {args.dataset} (its search "
                        "events are real)")
    if args.dataset == "unisar":
        if k_core:
            raise DataError("--k-core does not apply to unisar (its files are filtered "
                            "already)")
        return options(data_dir=args.data_dir, name=args.data_dir.name)
    return options(data_dir=args.data_dir, **k_core)


def _prepare(args: argparse.Namespace) -> None:
    from gensr_ray.config import ConfigError
    from gensr_ray.data.writer import WriteOptions
    from gensr_ray.prepare import prepare_dataset

    for flag, value in (("--train-negatives", args.train_negatives),
                        ("--eval-negatives", args.eval_negatives)):
        if value < 1:
            raise ConfigError(f"{flag}={value}: every example needs at least one negative")
    write = WriteOptions(seed=args.seed, rows_per_shard=args.rows_per_shard,
                         overwrite=args.overwrite, train_negatives=args.train_negatives,
                         eval_negatives=args.eval_negatives)
    prepare_dataset(_loader_options(args), args.out, write, with_cf=not args.no_cf)


def _pretraining(args: argparse.Namespace, command: str, hint: str = "") -> tuple[Path, dict]:
    """The checks `pretrain-cf` and `pretrain-sasrec` share: a local prepared dataset and
    --epochs >= 1; the dataset's path and the config overrides (seed, epochs)."""
    from gensr_ray.config import ConfigError
    from gensr_ray.data.contract import read_meta
    from gensr_ray.storage import is_uri

    if args.epochs is not None and args.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {args.epochs}")
    if is_uri(args.data):
        raise ConfigError(f"{command} --data {args.data}: needs a local dataset directory{hint}")
    read_meta(args.data)
    return Path(args.data), {"seed": args.seed,
                             **({"epochs": args.epochs} if args.epochs is not None else {})}


def _pretrain_cf(args: argparse.Namespace) -> None:
    from gensr_ray.cf.lightgcn import LightGCNConfig, save_cf, train_lightgcn
    from gensr_ray.data.contract import cf_path

    data, overrides = _pretraining(args, "pretrain-cf", "; run `gensr prepare` with --out on "
                                   "object storage, which trains the tables before the upload")
    if args.device is not None:
        from gensr_ray.cf.lightgcn import resolve_device
        from gensr_ray.config import ConfigError

        try:
            resolve_device(args.device)
        except ValueError as error:
            raise ConfigError(f"pretrain-cf --device: {error}") from None
        overrides["device"] = args.device
    started = time.perf_counter()
    save_cf(train_lightgcn(data, LightGCNConfig(**overrides)), cf_path(data))
    print(f"LightGCN tables written to {cf_path(data)} ({time.perf_counter() - started:.1f}s)")


def _pretrain_sasrec(args: argparse.Namespace) -> None:
    from gensr_ray.eval.sasrec import SASRecConfig, pretrain_sasrec

    data, overrides = _pretraining(args, "pretrain-sasrec")
    started = time.perf_counter()
    path = pretrain_sasrec(data, SASRecConfig(**overrides))
    print(f"SASRec model written to {path} ({time.perf_counter() - started:.1f}s)")


def _eval(args: argparse.Namespace) -> None:
    from gensr_ray.eval.harness import format_table, write_results
    from gensr_ray.eval.run import evaluate_run

    if not (args.checkpoint or args.baselines):
        raise SystemExit("gensr eval: nothing to evaluate; pass --checkpoint and/or --baselines")
    if not (args.checkpoint or args.data):
        raise SystemExit("gensr eval: --data is required with --baselines alone")
    if args.out:
        _check_writable(args.out)  # before the work, not after it
    started = time.perf_counter()
    if args.checkpoint:
        from gensr_ray.checkpoint import resolve_checkpoint

        args.checkpoint = resolve_checkpoint(args.checkpoint, args.which)
    cfg = None
    if args.set:
        if not args.checkpoint:
            raise SystemExit("gensr eval: --set changes a checkpoint's config; pass --checkpoint")
        from gensr_ray.checkpoint import read_checkpoint_config
        from gensr_ray.config import apply_overrides

        cfg = apply_overrides(read_checkpoint_config(args.checkpoint), args.set)
    results = evaluate_run(args.checkpoint, args.data, args.split, args.baselines,
                           args.max_examples, cfg=cfg, allow_data_change=args.allow_data_change)
    print(format_table(results))
    if args.out:
        write_results(results, args.out)
        print(f"results written to {args.out} ({time.perf_counter() - started:.1f}s)")


def _export(args: argparse.Namespace) -> None:
    from gensr_ray.export import export_checkpoint

    started = time.perf_counter()
    out = export_checkpoint(args.checkpoint, args.out, args.which)
    files = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    print(f"exported to {out} ({time.perf_counter() - started:.1f}s): "
          f"{', '.join(f for f in files if not f.startswith('backbone/'))}"
          f"{', backbone/' if (out / 'backbone').is_dir() else ''}")


def _compare(args: argparse.Namespace) -> None:
    import json

    from gensr_ray.atomic import atomic_write_text
    from gensr_ray.eval.compare import (
        add_against,
        by_popularity,
        compare_runs,
        format_breakdown,
        format_comparison,
        load_results,
    )

    if args.out:
        _check_writable(args.out)
    runs = load_results(args.results)
    if args.against:
        add_against(runs, args.results, load_results(args.against), args.against, args.model)
    result = compare_runs(runs, args.results, args.model, args.metric, args.resamples)
    table = format_comparison(result)
    if args.data is not None:
        result["by_popularity"] = by_popularity(result, runs, args.data)
        table += "\n" + format_breakdown(result, result["by_popularity"])
    print(table, end="")
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
        atomic_write_text(args.out.with_suffix(".md"), table)
        print(f"comparison written to {args.out} and {args.out.with_suffix('.md')}")


def _diagnose(args: argparse.Namespace) -> None:
    from gensr_ray.config import ConfigError
    from gensr_ray.train.conflict import format_table
    from gensr_ray.train.diagnose import run_diagnosis

    if (args.checkpoint is None) == (args.study is None):
        raise ConfigError("give either --checkpoint (one run) or --study (every run of a "
                          "gensr tune study)")
    started = time.perf_counter()
    if args.study is not None:
        from gensr_ray.train.conflict_study import diagnose_study, format_study_table

        result = diagnose_study(args.study, args.out, args.batches, args.examples, args.seed,
                                args.workers, args.which, args.reference)
        print(format_study_table(result["trials"]))
        print(f"conflict_study.json, .md and .png written to {args.out} "
              f"({time.perf_counter() - started:.1f}s)")
        return
    summary = run_diagnosis(args.checkpoint, args.out, args.batches, args.examples, args.seed,
                            args.workers, args.which)
    print(format_table(summary))
    print(f"conflict.json and conflict.png written to {args.out} "
          f"({time.perf_counter() - started:.1f}s)")


def _check_writable(path: Path) -> None:
    import os

    if path.is_dir():
        raise FileExistsError(f"--out {path} is a directory; name the results file")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileExistsError(f"--out {path}: cannot create {parent} ({exc.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise FileExistsError(f"--out {path}: {parent} is not writable")


def _train(args: argparse.Namespace) -> None:
    import json

    from gensr_ray.config import load_config
    from gensr_ray.prepare import ensure_data
    from gensr_ray.train.launch import run_training

    overrides = args.set + (["data.allow_change=true"] if args.allow_data_change else [])
    cfg = ensure_data(load_config(args.config, overrides))
    result = run_training(cfg, args.out)
    print(f"final metrics: {json.dumps(result['metrics'], default=float)}")
    print(f"final checkpoint: {result['checkpoint']}")
    if "best_checkpoint" in result:
        print(f"best checkpoint: {result['best_checkpoint']} ({result['best_metric']} = "
              f"{result['best_value']:.4f}; gensr eval evaluates it by default)")


def _tune(args: argparse.Namespace) -> None:
    from gensr_ray.config import ConfigError, load_config
    from gensr_ray.prepare import ensure_data
    from gensr_ray.storage import is_uri
    from gensr_ray.study import load_sweep, report_study, run_study
    from gensr_ray.sweep import select

    if is_uri(args.out):
        # trials' checkpoints may live on object storage; the study's report is the driver's
        raise ConfigError(f"tune --out {args.out}: the study directory is a local directory on "
                          "the driver; put the trials' checkpoints on object storage with "
                          "--set scale.storage_path=s3://BUCKET/PREFIX")
    args.out = Path(args.out)
    sweep = select(load_sweep(args.sweep), args.trials, args.seeds)
    cfg = load_config(args.config, args.set)
    if args.report_only:  # the trials have run: no data, no Ray cluster needed
        study = report_study(cfg, sweep, args.out)
    else:
        study = run_study(ensure_data(cfg), sweep, args.out, resume=args.resume)
    print((Path(args.out) / "report.md").read_text())
    if study.get("unfinished"):
        print(f"{study['unfinished']} runs have not finished and are not in the report "
              "(gensr tune --resume runs them)")
    print(f"winner: {study['best']}; report in {args.out}/report.{{md,csv,png}}; "
          f"Tune experiment in {study['experiment']} (tensorboard --logdir {study['experiment']})")


def _config(args: argparse.Namespace) -> None:
    import yaml

    from gensr_ray.config import describe_settings, load_config

    if args.action == "show":
        print(yaml.safe_dump(load_config(args.config, args.set).to_dict(), sort_keys=False),
              end="")
        return
    for row in describe_settings():
        default = "''" if row["default"] == "" else row["default"]
        allowed = (f"; one of: {', '.join(repr(c) if c == '' else c for c in row['choices'])}"
                   if row["choices"] else f"; {row['range']}" if row["range"] else "")
        print(f"{row['key']}  ({row['type']}, default {default}{allowed})\n    {row['help']}")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gensr_ray")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gensr", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the workers' output on this console "
                             "(default: in Ray's log files)")
    parser.add_argument("--version", action="version", version=f"gensr {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print a resolved config, or every setting's help")
    p.add_argument("action", choices=["show", "help"],
                   help="show: the config after --config and --set, as YAML; help: every "
                        "setting with its type, default and meaning")
    p.add_argument("--config", type=Path, default=None, help="YAML config (show; default: "
                                                             "the built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.set_defaults(func=_config)

    p = sub.add_parser("prepare", help="build a dataset in the on-disk contract")
    p.add_argument("--dataset", choices=["ml100k", "synthetic", "amazon", "kuaisar", "unisar"],
                   required=True, help="unisar: the UniSAR authors' processed KuaiSAR or "
                                       "Amazon pickles, read without running code")
    p.add_argument("--out", required=True, help="output directory or URI (s3://, gs://)")
    p.add_argument("--source", type=Path, default=None,
                   help="ml100k: local recbole-1.2.1 wheel or ml-100k directory (default: "
                        "download the wheel into $GENSR_CACHE)")
    p.add_argument("--reviews", type=Path, default=None,
                   help="amazon: reviews JSON-lines file (2014 or 2018 release, .gz or not)")
    p.add_argument("--meta", type=Path, default=None,
                   help="amazon: metadata file of the same category (JSON or dict literals)")
    p.add_argument("--query-files", type=Path, default=None,
                   help="amazon: directory of HEM query files (query_text.txt.gz or "
                        "query.txt.gz [+ vocab.txt.gz], *.qrels[.gz])")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="kuaisar: directory with rec_inter.csv, src_inter.csv, "
                        "item_features.csv; unisar: data/<name> with dataset/*.pkl")
    p.add_argument("--k-core", type=int, default=None,
                   help="amazon, kuaisar: keep the k-core of users and items (default 5)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--search-fraction", type=float, default=None,
                   help="ml100k, synthetic, amazon: share of each user's events that become "
                        "search events (amazon default 0.5)")
    p.add_argument("--train-negatives", type=int, default=4,
                   help="stored negatives per training example (train.negatives_per_example "
                        "uses up to this many)")
    p.add_argument("--eval-negatives", type=int, default=99,
                   help="stored negatives per valid/test example (the sampled protocol). A "
                        "user who touched all but fewer items gets every untouched one; "
                        "meta.json counts such examples")
    p.add_argument("--rows-per-shard", type=int, default=8192)
    p.add_argument("--no-cf", action="store_true", help="skip LightGCN pretraining")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("pretrain-cf", help="(re)train the LightGCN tables of a dataset")
    p.add_argument("--data", required=True, help="a local dataset directory")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default=None,
                   help="where to propagate the graph: auto (a GPU when torch sees one; the "
                        "default), cpu, cuda, cuda:N")
    p.set_defaults(func=_pretrain_cf)

    p = sub.add_parser("pretrain-sasrec",
                       help="(re)train the SASRec baseline of a dataset (cf/sasrec.pt)")
    p.add_argument("--data", required=True, help="a local dataset directory")
    p.add_argument("--epochs", type=int, default=None, help="default: 20")
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(func=_pretrain_sasrec)

    p = sub.add_parser("train", help="train GenSR with Ray Train + DeepSpeed")
    p.add_argument("--config", type=Path, required=True, help="YAML config (configs/)")
    p.add_argument("--out", required=True, help="run directory or URI (s3://, gs://)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume a run whose dataset or LightGCN tables changed since its "
                        "checkpoint")
    p.set_defaults(func=_train)

    p = sub.add_parser("tune", help="a Ray Tune ablation study over a sweep file")
    p.add_argument("--config", type=Path, required=True, help="base YAML config")
    p.add_argument("--sweep", type=Path, required=True, help="configs/sweeps/NAME.yaml")
    p.add_argument("--out", required=True,
                   help="local study directory (report.*); checkpoints follow "
                        "scale.storage_path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base config value (repeatable)")
    p.add_argument("--trials", nargs="+", metavar="NAME",
                   help="run only these trials of the sweep (its reference among them)")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                   help="run every trial once per these seeds instead of the sweep's")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the study in --out: run only its trials that did not "
                           "finish (interrupted, failed), each from its last checkpoint, "
                           "then write the report of all")
    mode.add_argument("--report-only", action="store_true",
                      help="rewrite the report of a study that has run in --out, from its "
                           "Tune directory, without running a trial")
    p.set_defaults(func=_tune)

    p = sub.add_parser("eval", help="evaluate a checkpoint and/or the baselines on a split")
    _checkpoint_arguments(p, required=False)
    p.add_argument("--data", default=None,
                   help="prepared dataset, local or a URI (default: the checkpoint's)")
    p.add_argument("--baselines", action="store_true",
                   help="popularity, LightGCN, SASRec and BM25 in the same harness")
    p.add_argument("--split", choices=["valid", "test"], default=None,
                   help="default: the checkpoint config's eval.split, else test")
    p.add_argument("--max-examples", type=int, default=None,
                   help="seeded subset of examples per task (default: eval.max_examples)")
    p.add_argument("--out", type=Path, default=None, help="results JSON")
    p.add_argument("--allow-data-change", action="store_true",
                   help="evaluate a checkpoint on data other than it was trained on")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the checkpoint's config, e.g. --set eval.num_workers=4 "
                        "(repeatable)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("compare", help="one model's runs (one results file per seed) against "
                                       "the baselines: mean, sd and paired intervals")
    p.add_argument("results", nargs="+", type=Path,
                   help="gensr eval --out files, one per run, of the same split and examples")
    p.add_argument("--model", default="gensr", help="the model compared (default gensr)")
    p.add_argument("--against", nargs="+", type=Path, default=[], metavar="RESULTS",
                   help="other runs of the model (e.g. before a config change), one per run "
                        "in the same seed order: compared as the model 'against runs', paired per "
                        "example")
    p.add_argument("--metric", default="NDCG@10",
                   help="per-example metric of the paired comparison: HR@K or NDCG@K")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    p.add_argument("--data", type=Path, default=None,
                   help="the runs' dataset: also break each task down by the target's number "
                        "of training interactions (quartiles), head to tail")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON of the comparison (its markdown table beside it, .md)")
    p.set_defaults(func=_compare)

    p = sub.add_parser("diagnose", help="gradient conflict between search and "
                                        "recommendation of a checkpoint or of a whole study")
    _checkpoint_arguments(p, required=False)
    p.add_argument("--study", type=Path, default=None,
                   help="a gensr tune --out directory: diagnose every run of it, and compare "
                        "the trials over their seeds (instead of --checkpoint)")
    p.add_argument("--reference", default=None,
                   help="with --study: the trial the others' cosine is compared with "
                        "(default: the study's first, e.g. the discriminative twin)")
    p.add_argument("--out", type=Path, required=True,
                   help="directory for conflict.json and conflict.png (with --study: one "
                        "folder per run, and conflict_study.json, .md and .png)")
    p.add_argument("--batches", type=int, default=8, help="seeded batches (default 8)")
    p.add_argument("--examples", type=int, default=16,
                   help="training examples of each task per batch (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batches")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray Train workers (default: the checkpoint config's)")
    p.set_defaults(func=_diagnose)

    p = sub.add_parser("export", help="a checkpoint as peft adapters, safetensors and a "
                                      "model card")
    _checkpoint_arguments(p, required=True)
    p.add_argument("--out", type=Path, required=True,
                   help="directory to write (must not exist, or be empty)")
    p.set_defaults(func=_export)
    return parser


def _checkpoint_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    """--checkpoint and --which, as every command that reads a checkpoint takes them."""
    p.add_argument("--checkpoint", required=required, default=None,
                   help="a gensr train --out directory or checkpoint, local or a URI")
    p.add_argument("--which", choices=["best", "last"], default="best",
                   help="for a gensr train --out directory: its best checkpoint by "
                        "train.best_metric (when it validated during training; else its last) "
                        "or its last")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from gensr_ray.console import configure

    configure(args.verbose)
    from gensr_ray.checkpoint import CheckpointError
    from gensr_ray.config import ConfigError
    from gensr_ray.data.contract import DataError

    # SIGTERM (a scheduler's stop, `kill`) exits through Python, so the local Ray cluster
    # this process started is shut down with it rather than left running
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        args.func(args)
    except (DataError, ConfigError, CheckpointError, FileExistsError,
            FileNotFoundError) as exc:
        print(f"gensr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
