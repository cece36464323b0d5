"""The UniSAR authors' processed KuaiSAR / Amazon files (TengShi-RUC/UniSAR, data/<name>/),
read without running code from them.

    <dir>/dataset/{src,rec}_{train,val,test}.pkl   pandas DataFrames, one row per event:
                                                   user_id, item_id (+ keyword for search:
                                                   word ids, a list or its text)

The files are pickles: `pickle.load` runs whatever callable a file names. `load_pickle` reads
them with an unpickler that resolves only the pandas, numpy and pyarrow classes a DataFrame
of plain columns needs (and Python's own containers); any other name, such as `os.system`,
`eval` or pandas' own readers, is refused with an error naming the file and the global.

What the files do not hold, and how the dataset is made without it: item titles and query
text (the items are "item <id>" and a query is its word ids, "w<id> w<id> ..."), and event
times (each user's events are ordered train, then validation, then test, in file order; the
contract's own split rule then puts each user's last event of a task in test, as the
authors' leave-one-out does). The authors' stored negatives and history counts are not used:
the writer draws its own.
"""

from __future__ import annotations

import ast
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gensr_ray.data.contract import DataError
from gensr_ray.data.writer import RawDataset

SPLITS = ("train", "val", "test")
KINDS = {"rec": "rec", "src": "search"}  # file prefix -> task

_CONTAINERS = {"list", "dict", "tuple", "set", "frozenset", "int", "float", "complex", "bool",
               "str", "bytes", "bytearray", "slice", "range"}
# module -> the names a DataFrame of plain columns (and dicts, lists, arrays) needs, across
# pandas 1.x-3.x, numpy 1.x-2.x
_ALLOWED = {
    "builtins": _CONTAINERS, "__builtin__": _CONTAINERS,
    "_codecs": {"encode"},  # protocol 2 writes bytes as encode(text, "latin1")
    "copyreg": {"_reconstructor"},  # rebuilds an instance of a class allowed here
    "collections": {"OrderedDict", "defaultdict"},
    "numpy": {"dtype", "ndarray"},
    "numpy.core.multiarray": {"_reconstruct", "scalar"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
    "numpy.core.numeric": {"_frombuffer"}, "numpy._core.numeric": {"_frombuffer"},
    "pandas": {"DataFrame", "Series", "Index", "RangeIndex", "StringDtype"},
    "pandas.core.frame": {"DataFrame"}, "pandas.core.series": {"Series"},
    "pandas.core.internals.managers": {"BlockManager", "SingleBlockManager"},
    "pandas.core.internals.blocks": {"new_block", "Block", "ObjectBlock", "NumericBlock",
                                     "IntBlock", "FloatBlock"},
    "pandas._libs.internals": {"_unpickle_block", "BlockPlacement"},
    "pandas.core.indexes.base": {"_new_Index", "Index"},
    "pandas.core.indexes.range": {"RangeIndex"},
    "pandas.core.indexes.numeric": {"Int64Index", "Float64Index", "UInt64Index"},
    "pandas.arrays": {"ArrowStringArray", "StringArray"},
    "pandas.core.arrays.string_": {"StringArray", "StringDtype"},
    "pandas.core.arrays.string_arrow": {"ArrowStringArray"},
    "pyarrow.lib": {"_restore_array", "py_buffer", "type_for_alias"},
}


def _unpickler_class():
    """pandas' own unpickler (it maps the names older pandas wrote to today's), restricted."""
    from pandas.compat.pickle_compat import Unpickler

    class RestrictedUnpickler(Unpickler):
        path = Path()

        def find_class(self, module: str, name: str):
            if name in _ALLOWED.get(module, ()) or (module == "numpy.dtypes"
                                                    and name.endswith("DType")):
                return super().find_class(module, name)
            raise DataError(f"{self.path}: refused to load {module}.{name}: the file may "
                            "only hold a pandas DataFrame of plain columns (it could run code)")

    return RestrictedUnpickler


def load_pickle(path: Path):
    """Unpickle a UniSAR file with the restricted unpickler (see the module docstring)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        unpickler = _unpickler_class()(io.BytesIO(data))
        unpickler.path = Path(path)
        return unpickler.load()
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise DataError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None


@dataclass
class UniSAROptions:
    data_dir: Path
    name: str = "UniSAR"
    notes: dict = field(default_factory=dict)


def _words(value, where: str) -> list[int]:
    """A keyword cell as word ids: a list, an int, or the text of a list (never eval'd)."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise DataError(f"{where}: keyword {value[:40]!r} is not a list of word ids") from None
    if isinstance(value, (int, np.integer)):
        value = [value]
    if not isinstance(value, (list, tuple, np.ndarray)) or not all(
            isinstance(w, (int, np.integer)) for w in value):
        raise DataError(f"{where}: keyword {str(value)[:40]!r} is not a list of word ids")
    return [int(w) for w in value if int(w) != 0]  # 0 pads


def load_unisar(opts: UniSAROptions) -> RawDataset:
    root = Path(opts.data_dir)
    if not (root / "dataset").is_dir():
        raise DataError(f"{root}: not a UniSAR data directory (no dataset/ with "
                        "{src,rec}_{train,val,test}.pkl)")
    users: list[str] = []
    items: list[str] = []
    tasks: list[str] = []
    queries: list[str | None] = []
    lines: list[int] = []
    for split in SPLITS:
        for prefix, task in KINDS.items():
            path = root / "dataset" / f"{prefix}_{split}.pkl"
            if not path.is_file():
                raise DataError(f"{path}: missing (UniSAR's dataset/ holds "
                                "{src,rec}_{train,val,test}.pkl)")
            frame = load_pickle(path)
            columns = ["user_id", "item_id"] + (["keyword"] if task == "search" else [])
            missing = [c for c in columns if not hasattr(frame, "columns")
                       or c not in frame.columns]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing} (a UniSAR "
                                f"{prefix}_{split} file has {columns})")
            user_col = frame["user_id"].tolist()
            item_col = frame["item_id"].tolist()
            words = frame["keyword"].tolist() if task == "search" else [None] * len(user_col)
            for row, (u, i, k) in enumerate(zip(user_col, item_col, words)):
                users.append(str(int(u)))
                items.append(str(int(i)))
                tasks.append(task)
                queries.append(" ".join(f"w{w}" for w in _words(k, f"{path}: row {row}"))
                               if task == "search" else None)
                lines.append(row)
    empty = [r for r, (t, q) in enumerate(zip(tasks, queries)) if t == "search" and not q]
    if empty:
        raise DataError(f"{root}: search event {empty[0]} has no keyword word ids")
    item_ids = sorted(set(items), key=int)
    return RawDataset(
        source=f"UniSAR-processed {opts.name} ({root})", items_file=str(root / "dataset"),
        interactions_file=str(root / "dataset"), item_ids=item_ids,
        titles=[f"item {i}" for i in item_ids], texts=[f"item {i}" for i in item_ids],
        user_ids=users, inter_item_ids=items, tasks=tasks, queries=queries,
        # no times in the files: each user's events in split order, then file order
        timestamps=list(range(len(users))), lines=lines,
        notes={"format": "UniSAR processed pickles", "titles": "none in the files: 'item <id>'",
               "queries": "word ids as 'w<id>' tokens", "times": "split order, then file order"},
        readme=("Built from the UniSAR authors' processed files: no item titles or query text "
                "in them (items are 'item <id>', queries their word ids), and no event times "
                "(events ordered train, valid, test, then by row)."))
