"""Small files in the published formats of the Amazon review releases and of KuaiSAR, for the
loader tests. Every writer returns paths; sizes satisfy the 5-core and leave > 99 untouched
items per user, as evaluation needs."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

N_ITEMS = 120
N_USERS = 80
PER_USER = 10

# (category paths 2014-style, the query HEM makes of each multi-level path)
PATHS = [
    [["Books", "Science Fiction & Fantasy", "Science Fiction"], ["Kindle Store"]],
    [["Books", "Mystery, Thriller & Suspense", "Thrillers"]],
    [["Kindle Store", "Kindle eBooks", "Romance"], ["Books", "Romance"]],
    [["Books"]],  # one level: no query, reviews of these items stay recommendation events
]


def asin(i: int) -> str:
    return f"B{i:09d}"


def reviewer(u: int) -> str:
    return f"A{u:04d}REVIEWER"


def review_events() -> list[tuple[str, str, int]]:
    """(reviewerID, asin, unixReviewTime): every item reviewed by >= 6 users, users by 10."""
    events = []
    for u in range(N_USERS):
        for j in range(PER_USER):
            events.append((reviewer(u), asin((u * PER_USER + j) % N_ITEMS),
                           1_400_000_000 + 86_400 * (u + 3 * j)))
    return events


def _write(path: Path, lines: list[str]) -> Path:
    data = ("\n".join(lines) + "\n").encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def review_line(user: str, item: str, stamp: int, **extra) -> str:
    record = {"reviewerID": user, "asin": item, "reviewerName": "J. Doe", "helpful": [0, 0],
              "reviewText": "Loved it.", "overall": 5.0, "summary": "Five stars",
              "unixReviewTime": stamp, "reviewTime": "05 13, 2014"}
    record.update(extra)
    return json.dumps(record)


def meta_2014_line(i: int) -> str:
    record = {"asin": asin(i), "title": f"Novel number {i}", "price": 3.99,
              "imUrl": "http://ecx.images-amazon.com/images/I/x.jpg",
              "related": {"also_bought": [asin((i + 1) % N_ITEMS)]},
              "salesRank": {"Books": 1000 + i}, "categories": PATHS[i % len(PATHS)]}
    return repr(record)  # McAuley 2014 metadata: Python dict literals, single quotes


def write_amazon_2014(root: Path, extra_reviews: list[str] = (), extra_meta: list[str] = (),
                      reviews_name: str = "reviews_Kindle_Store_5.json.gz",
                      meta_name: str = "meta_Kindle_Store.json.gz") -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    events = review_events()
    lines = [review_line(*e) for e in events[::-1]]  # newest first: out of time order
    reviews = _write(root / reviews_name, lines + list(extra_reviews))
    meta = _write(root / meta_name, [meta_2014_line(i) for i in range(N_ITEMS)] + list(extra_meta))
    return reviews, meta


def meta_2018_line(i: int) -> str:
    titles = [
        f'<span class="a-size-large">Trail Shoe {i}</span>',
        "var aPageStart = (new Date()).getTime();",  # HTML/JS debris instead of a title
        f"Rain Jacket &amp; Hood {i}",
        "",
    ]
    record = {"category": ["Clothing, Shoes &amp; Jewelry", "Women", "Shoes",
                           "</span></span></span>"],
              "tech1": "", "description": [f"A <b>light</b> shoe for trails, model {i}."],
              "fit": "", "title": titles[i % len(titles)], "also_buy": [], "brand": "Acme",
              "feature": [], "rank": "12 in Shoes", "also_view": [], "main_cat": "Fashion",
              "similar_item": "", "date": "", "price": "$30.00", "asin": asin(i),
              "imageURL": [], "imageURLHigh": []}
    return json.dumps(record)


def write_amazon_2018(root: Path) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    lines = [review_line(u, a, t, verified=True, vote="2", style={"Size:": " 8"})
             for u, a, t in review_events()]
    reviews = _write(root / "Clothing_Shoes_and_Jewelry_5.json", lines)
    meta = [meta_2018_line(i) for i in range(N_ITEMS)] + [meta_2018_line(0)]  # a repeated item
    return reviews, _write(root / "meta_Clothing_Shoes_and_Jewelry.json.gz", meta)


# KuaiSAR ---------------------------------------------------------------------------------

REC_HEADER = ["user_id", "item_id", "playing_time", "duration_ms", "time", "timestamp", "click",
              "forward", "like", "follow", "search", "search_item_related"]
SRC_HEADER = ["user_id", "search_session_id", "search_session_time", "search_session_timestamp",
              "keyword", "search_source", "item_id", "click_cnt", "item_type"]
ITEM_HEADER = ["item_id", "caption", "author_id", "item_type", "upload_time", "upload_type"] + [
    f"{lv}_level_category_{kind}" for lv in ("first", "second", "third", "fourth")
    for kind in ("id", "name", "name_en")]
CATEGORIES = [("搞笑", "Funny", "搞笑段子", "Funny joke"), ("美食", "Food", "家常菜", "Home cooking"),
              ("游戏", "Games", "空", "empty")]


def kuaisar_item_id(i: int) -> int:
    return 103_656_000_000 + i


def kuaisar_rows() -> tuple[list[list], list[list], list[list]]:
    rec, src, items = [], [], []
    for i in range(N_ITEMS):
        zh1, en1, zh2, en2 = CATEGORIES[i % len(CATEGORIES)]
        items.append([kuaisar_item_id(i), f"[{i}, {i + 500}, 7]", 10 + i, "NORMAL", "2023-04-22",
                      "LongImport", 9, zh1, en1, 136, zh2, en2, 0, "空", "empty", 0, "空", "empty"])
    session = 0
    for u in range(N_USERS):
        for j in range(PER_USER):
            item = kuaisar_item_id((u * PER_USER + j) % N_ITEMS)
            stamp = 1_684_742_000_000 + 60_000 * (u + 3 * j)
            if j % 3 == 0:  # a search session with one clicked and one skipped result
                session += 1
                keyword = f"[{20 + u % 5}, 34, {j}]"
                for shown, clicked in ((item, 1), (kuaisar_item_id(999), 0)):
                    src.append([u, session, "2023-05-22 21:58:52", float(stamp), keyword,
                                "USER_INPUT", shown, clicked, "VIDEO"])
            else:
                rec.append([u, item, 60792.0, 45400.0, "2023-05-22 15:53:20", float(stamp), 1, 0,
                            0, 0, 0, 0])
                rec.append([u, kuaisar_item_id((u + 7) % N_ITEMS), 100.0, 45400.0,
                            "2023-05-22 15:53:20", float(stamp + 1), 0, 0, 0, 0, 0, 0])
    return rec, src, items


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_kuaisar(root: Path, rec_extra: list[list] = (), src_extra: list[list] = (),
                  item_extra: list[list] = ()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rec, src, items = kuaisar_rows()
    # pandas' to_csv index column, as in files written with index=True
    write_csv(root / "rec_inter.csv", [""] + REC_HEADER,
              [[k] + r for k, r in enumerate(rec + list(rec_extra))])
    write_csv(root / "src_inter.csv", SRC_HEADER, src + list(src_extra))
    write_csv(root / "item_features.csv", ITEM_HEADER, items + list(item_extra))
    return root
