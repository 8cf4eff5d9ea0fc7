"""Interaction datasets: reading every supported file layout into one `Dataset`, and the splits.

Every layout ends in the same place, `build_dataset`, so ordering rules live in one spot: each user's
events are sorted by time with ties kept in file order, users keep their order of first appearance, and
items get contiguous internal ids in order of first appearance after that sort. The result is
deterministic, so a model's item map and a dataset fingerprint are reproducible across runs.

A file is read right or refused, never misread: a row of numbers means nothing by itself (MovieLens-100K's
`user item rating timestamp` rows read as one-user-per-line lines give 943 users of 50,964 "items"), so
the layout is recognised from the file's delimiter, header and column contents, and a file that fits
none, or more than one, is refused with a message naming the candidates (`--format` or `--columns` then
says which). Layouts (`LAYOUTS`, the names `format=` takes):
  movielens-csv   MovieLens 20M/25M/latest `ratings.csv`: header `userId,movieId,rating,timestamp`
  movielens-dat   MovieLens 1M/10M `ratings.dat`: `UserID::MovieID::Rating::Timestamp`, no header
  movielens-100k  MovieLens 100K `u.data`: tab-separated `user item rating timestamp`, no header
  taobao          Taobao UserBehavior: `user_id,item_id,category_id,behavior,timestamp`, no header
  lines           one user a line, `uid i1 i2 ...`, chronological, no time (LastFM.txt, Beauty.txt)
  pairs           one event a line, `uid iid`, file order is time order
  csv             a CSV/TSV whose header names the columns (`COLUMN_NAMES`, any case)
and `columns=` describes any other table (see `load_dataset`).

Actions are small ints, 0 meaning "no action". MovieLens ratings (0.5..5 stars) become round(2 * rating)
in 1..10; Taobao behaviours become `BEHAVIORS` (pv 1, cart 2, fav 3, buy 4); an `action` column of
integers is taken as it is. `Dataset.engagement_actions` says which action ids count as engagement, the
positive label of a ranking head: rating >= 4 (`RATING_ENGAGEMENT`), a cart, favourite or buy
(`BEHAVIOR_ENGAGEMENT`), or none known for raw action ids.

Tables are parsed by numpy's C parser (about 1 s per million rows, integer ids parsed as numbers), which
keeps ml-25m feasible; ids that are not integers are read as strings, and when a file is rejected, a
slow line-by-line pass finds the offending line for the error message.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from kvrec.models.state import Events

BEHAVIORS = {"pv": 1, "cart": 2, "fav": 3, "buy": 4}  # Taobao UserBehavior's behaviour -> action id
BEHAVIOR_ENGAGEMENT = frozenset({2, 3, 4})  # a cart, favourite or purchase among page views
RATING_ENGAGEMENT = frozenset(range(8, 11))  # round(2 * rating) for ratings of 4 stars or more
MAX_ACTION = 65535  # the service's largest action id

ROLES = ("user", "item", "time", "rating", "action")
# Header names recognised in any case, by role. "-" in a list of roles marks an ignored column.
COLUMN_NAMES = {
    "user": ("user", "userid", "user_id", "uid"),
    "item": ("item", "itemid", "movieid", "item_id", "movie_id", "iid"),
    "time": ("timestamp", "ts", "time"),
    "rating": ("rating",),
    "action": ("action", "behavior", "behaviour"),
}
_ROLE_OF = {name: role for role, names in COLUMN_NAMES.items() for name in names}
_DIR_CANDIDATES = ("ratings.csv", "ratings.dat", "u.data", "events.csv", "*.txt", "*.csv")
_INT = re.compile(r"[+-]?\d+")
_HEAD_LINES = 1000  # lines read to recognise a layout


class DataError(ValueError):
    """Unreadable, malformed, ambiguous or empty input; the message names the file (and line, where there is one)."""


@dataclass(frozen=True)
class Layout:
    """How a file's lines become events: the delimiter, the header line, and each column's role.

    delimiter: ",", "\\t", "::" or " " (any whitespace); None in `LAYOUTS` where the file decides.
    header_line: the 1-based line of the header (0: none), the lines up to it are skipped.
    roles: one a column (`ROLES` or "-" for an ignored one); empty for `lines`, whose rows vary.
    """

    name: str
    what: str
    delimiter: str | None = None
    header_line: int = 0
    roles: tuple[str, ...] = ()

    def __str__(self) -> str:
        read = f"; columns {', '.join(self.roles)}" if self.roles else ""
        return f"{self.name} ({self.what}{read})"


_ML_ROLES = ("user", "item", "rating", "time")
LAYOUTS = {
    layout.name: layout
    for layout in (
        Layout("movielens-csv", "MovieLens 20M/25M/latest ratings.csv, with a header", ",", 1, _ML_ROLES),
        Layout("movielens-dat", "MovieLens 1M/10M ratings.dat, ::-separated, no header", "::", 0, _ML_ROLES),
        Layout("movielens-100k", "MovieLens 100K u.data, tab-separated, no header", "\t", 0, _ML_ROLES),
        Layout("taobao", "Taobao UserBehavior, comma-separated, no header", ",", 0,
               ("user", "item", "-", "action", "time")),
        Layout("lines", "one user a line: uid i1 i2 ..., chronological, no time", " "),
        Layout("pairs", "one event a line: user item, file order is time order", None, 0, ("user", "item")),
        Layout("csv", "a table whose header names its columns", None, 1),
    )
}
# Detection reads a headerless table as one of these when every column's contents fit (see `_kind`).
_SIGNATURES = {
    "movielens-dat": ("int", "int", "num", "int"),
    "movielens-100k": ("int", "int", "num", "int"),
    "taobao": ("int", "int", "int", "behavior", "int"),
}
_DELIMITER_NAMES = {",": "comma", "\t": "tab", "::": "::", " ": "whitespace"}


@dataclass
class Dataset:
    """Per-user event sequences with internal ids; `user_ids[u]` and `item_ids[i]` are the external ids."""

    name: str
    user_ids: list[str]
    item_ids: list[str]
    seqs: list[Events]
    has_time: bool  # False: ts is the event index within the user
    has_action: bool
    layout: Layout | None = None  # how the file was read, for `kvrec data stats`; None when built in code
    # The action ids that count as engagement (a ranking head's positive label); empty: none known.
    engagement_actions: frozenset[int] = field(default_factory=frozenset)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_events(self) -> int:
        return sum(len(s) for s in self.seqs)

    def item_index(self) -> dict[str, int]:
        """External item id -> internal id, the map that the API uses to translate requests."""
        return {item: i for i, item in enumerate(self.item_ids)}

    def fingerprint(self) -> str:
        """Short sha256 of the content (ids, items, times, actions), independent of the name."""
        h = hashlib.sha256(json.dumps([self.user_ids, self.item_ids]).encode())
        h.update(np.array([len(s) for s in self.seqs], dtype="<i8").tobytes())
        for part in ("items", "ts", "actions"):
            for s in self.seqs:
                h.update(getattr(s, part).numpy().astype("<i8").tobytes())
        return h.hexdigest()[:16]

    def stats(self) -> dict:
        """Size and sequence-length summary, the numbers of the datasets README table."""
        lens = np.array([len(s) for s in self.seqs], dtype=np.int64)
        return {
            "users": len(self.seqs),
            "items": self.num_items,
            "events": int(lens.sum()),
            "mean_len": float(lens.mean()),
            "median_len": float(np.median(lens)),
            "p90_len": float(np.percentile(lens, 90)),
            "max_len": int(lens.max()),
        }


def build_dataset(
    name: str,
    users: np.ndarray,
    items: np.ndarray,
    ts: np.ndarray | None = None,
    actions: np.ndarray | None = None,
    *,
    min_len: int = 1,
    source: str = "input",
    layout: Layout | None = None,
    engagement_actions: frozenset[int] = frozenset(),
) -> Dataset:
    """Group per-row arrays ([n] each, file order) into a `Dataset`; the one place ids are assigned.

    users, items: [n] external ids (ints or strings); ts: [n] int64 or None (then the event index);
    actions: [n] int64 or None (then 0). Users with fewer than `min_len` events are dropped first, so
    item ids stay contiguous over the items that remain.
    """
    u_uniq, u_first, u_inv = np.unique(users, return_index=True, return_inverse=True)
    counts = np.bincount(u_inv.reshape(-1), minlength=len(u_uniq))
    keep = counts[u_inv] >= min_len
    if not keep.any():
        raise DataError(f"{source}: no user has at least {min_len} events")
    if not keep.all():
        users, items = users[keep], items[keep]
        ts = None if ts is None else ts[keep]
        actions = None if actions is None else actions[keep]
        u_uniq, u_first, u_inv = np.unique(users, return_index=True, return_inverse=True)
    row_user = _rank_by_first(u_first)[u_inv.reshape(-1)]  # [n] user index by first appearance

    order = np.arange(len(row_user)) if ts is None else np.argsort(ts, kind="stable")
    order = order[np.argsort(row_user[order], kind="stable")]  # by user, then time, ties in file order
    row_user, items = row_user[order], items[order]
    counts = np.bincount(row_user).tolist()
    if ts is None:
        starts = np.repeat(np.cumsum([0] + counts[:-1]), counts)
        ts_sorted = np.arange(len(row_user)) - starts
    else:
        ts_sorted = ts[order]
    act_sorted = np.zeros(len(row_user), dtype=np.int64) if actions is None else actions[order]

    i_uniq, i_first, i_inv = np.unique(items, return_index=True, return_inverse=True)
    item_rank = _rank_by_first(i_first)
    item_ids = [str(x) for x in i_uniq[np.argsort(i_first)]]
    seqs = [
        Events(it, t, a)
        for it, t, a in zip(
            torch.from_numpy(item_rank[i_inv.reshape(-1)]).split(counts),
            torch.from_numpy(np.ascontiguousarray(ts_sorted, dtype=np.int64)).split(counts),
            torch.from_numpy(np.ascontiguousarray(act_sorted, dtype=np.int64)).split(counts),
            strict=True,
        )
    ]
    user_ids = [str(x) for x in u_uniq[np.argsort(u_first)]]
    has_action = actions is not None and bool(np.any(actions))
    return Dataset(name, user_ids, item_ids, seqs, has_time=ts is not None, has_action=has_action, layout=layout,
                   engagement_actions=engagement_actions)


def _rank_by_first(first: np.ndarray) -> np.ndarray:
    """[k] first-row index of each unique value -> [k] its rank in order of first appearance."""
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank


# ---------------------------------------------------------------------------------------------- loading

SYNTH = Layout("synth", "generated in memory by models.synth")


def datasets_root() -> Path:
    """Folder of the named datasets: `$KVREC_DATASETS`, else `../shared/datasets` beside the project."""
    env = os.environ.get("KVREC_DATASETS")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def load_dataset(
    source: str | os.PathLike,
    *,
    format: str | None = None,
    columns: str | Mapping[str, str] | None = None,
    min_len: int = 1,
) -> Dataset:
    """Load a file, a folder holding one, a dataset name under `datasets_root()`, or a synth spec.

    format: a `LAYOUTS` name; None recognises the layout from the file and refuses a file it cannot
    tell. columns: the file's columns instead, either in order ("user,item,-,rating,time": a role of
    `ROLES`, a `COLUMN_NAMES` name, or "-" for a column to ignore; a header naming known columns is
    skipped), or as role=name pairs naming a header's columns ("user=visitor,item=product" or a
    {role: name} mapping; the header's other known names are read as usual). Synth specs (`synth-long`,
    `synth-short:users=100,mean_len=50`) are generated in memory and take neither.
    """
    text = str(source)
    if text.startswith("synth") and not Path(text).exists():
        if format or columns:
            raise DataError(f"{text} is generated, not read from a file: it takes no format or columns")
        from kvrec.models import synth

        return replace(synth.from_spec(text), layout=SYNTH)
    path, name = _resolve(text)
    layout = _layout(path, format, columns)
    if layout.name == "lines":
        users, items = _read_lines(path, layout.header_line)
        ts = actions = None
        engagement = frozenset()
    else:
        users, items, ts, actions, engagement = _read_table(path, layout)
    return build_dataset(name, users, items, ts, actions, min_len=min_len, source=str(path), layout=layout,
                         engagement_actions=engagement)


def _resolve(source: str) -> tuple[Path, str]:
    """(data file, dataset name) for a file, a folder, or a folder name under the datasets root.

    The name is the folder's (`ml-latest-small`) when a folder is given, else the file's stem.
    """
    tried = list(dict.fromkeys([Path(source), datasets_root() / source]))  # one entry for an absolute path
    path = next((p for p in tried if p.exists()), None)
    if path is None:
        raise DataError(f"dataset {source!r} not found; looked for: {', '.join(map(str, tried))}; give a file, "
                        "a folder, a name under the datasets folder or a synth spec (synth-long, synth-short)")
    if path.is_file():
        return path, path.stem
    for pattern in _DIR_CANDIDATES:
        found = sorted(p for p in path.glob(pattern) if not p.name.lower().startswith("readme"))
        if len(found) > 1:
            raise DataError(f"{path}: several data files ({', '.join(p.name for p in found)}); name one")
        if found:
            return found[0], path.name
    raise DataError(f"{path}: no data file inside; looked for {', '.join(_DIR_CANDIDATES)}")


# ------------------------------------------------------------------------------------- recognising layouts


def _layout(path: Path, format: str | None, columns: str | Mapping[str, str] | None) -> Layout:
    """The layout that `format` or `columns` names, else the one the file's first lines fit."""
    head = _head(path)
    delimiter = _delimiter(head[0][1])
    if columns is not None:
        if format not in (None, "csv"):
            raise DataError(f"give a format or columns, not both: columns {columns!r} describe {path.name} already")
        return _from_columns(path, head, delimiter, columns)
    if format is None:
        return _detect(path, head, delimiter)
    if format not in LAYOUTS:
        raise DataError(f"unknown format {format!r}; known: {', '.join(LAYOUTS)}")
    if format == "csv":
        return _from_header(path, head, delimiter, required=True)
    known = replace(LAYOUTS[format], delimiter=LAYOUTS[format].delimiter or delimiter)
    header = _header_line(head, known.delimiter)
    if known.header_line and not header:
        raise DataError(f"{path.name} line {head[0][0]}: {format} has a header naming its columns, this line "
                        f"names none ({head[0][1][:80]}) ({path})")
    return replace(known, header_line=header)


def _header_line(head: list[tuple[int, str]], delimiter: str) -> int:
    """The first line's number when it names a known column (a header, whatever the layout), else 0."""
    lineno, line = head[0]
    return lineno if any(name.lower() in _ROLE_OF for name in _split(line, delimiter)) else 0


def _head(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the file's first non-blank lines, enough to recognise its layout."""
    head = []
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                head.append((lineno, line.rstrip("\r\n")))
                if len(head) == _HEAD_LINES:
                    break
    if not head:
        raise DataError(f"{path.name} line 1: empty file, no events ({path})")
    return head


def _delimiter(line: str) -> str:
    return next((d for d in ("::", "\t", ",") if d in line), " ")


def _split(line: str, delimiter: str) -> list[str]:
    if delimiter == " ":
        return line.split()
    fields = next(csv.reader([line])) if delimiter == "," else line.split(delimiter)
    return [f.strip() for f in fields]


def _detect(path: Path, head: list[tuple[int, str]], delimiter: str) -> Layout:
    """The one layout that the first lines fit: a known header, one user a line, or a known headerless
    table (`_SIGNATURES`, pairs); a file that fits none or several is refused with its candidates."""
    header = _from_header(path, head, delimiter, required=False)
    if header is not None:
        return header
    rows = [_split(line, delimiter) for _, line in head]
    sep = _DELIMITER_NAMES[delimiter]
    widths = sorted({len(r) for r in rows})
    if len(widths) > 1:
        if delimiter in (" ", "\t") and widths[0] >= 2:
            return LAYOUTS["lines"]
        lineno, row = next((lineno, r) for (lineno, _), r in zip(head, rows, strict=True) if len(r) != len(rows[0]))
        raise _refuse(path, f"{sep}-separated rows of {widths[0]} to {widths[-1]} fields (line {head[0][0]}: "
                      f"{len(rows[0])}, line {lineno}: {len(row)})", [])
    n = widths[0]
    numeric = ("int", "num")
    below = [_kind([r[k] for r in rows[1:]]) if len(rows) > 1 else "str" for k in range(n)]
    if any(k in numeric and _kind([v]) not in numeric for k, v in zip(below, rows[0], strict=True)):
        raise DataError(f"{path.name} line {head[0][0]}: looks like a header ({', '.join(rows[0])}) but names no "
                        f"known column (known: {', '.join(_ROLE_OF)}); say which with --columns, e.g. "
                        f"--columns user={rows[0][0]},item={rows[0][1 % n]} ({path})")
    kinds = [_kind([r[k] for r in rows]) for k in range(n)]
    for name, signature in _SIGNATURES.items():
        if LAYOUTS[name].delimiter == delimiter and _fits(kinds, signature):
            return LAYOUTS[name]
    if n == 2 and len({r[0] for r in rows}) < len(rows):  # a user on several lines: one event a line
        return replace(LAYOUTS["pairs"], delimiter=delimiter)
    if n > 2 and delimiter in (" ", "\t") and all(k == "str" for k in kinds[2:]):
        return LAYOUTS["lines"]  # equally long histories: a table's further columns would hold times or ratings
    fitting: dict[tuple[str, ...], list[str]] = {}  # the known tables, by roles, that fit but for the delimiter
    for name, signature in _SIGNATURES.items():
        if _fits(kinds, signature):
            fitting.setdefault(LAYOUTS[name].roles, []).append(name)
    candidates = [f"{' or '.join(names)} with {sep} separators (--columns {','.join(roles)})"
                  for roles, names in fitting.items()]
    if n == 2:
        candidates += ["pairs (user item) with one event per user", "lines (one user a line) with one item each"]
    elif n > 2 and delimiter in (" ", "\t"):
        candidates.append(f"lines (one user a line) with {n - 1} items each")
    if n > 2 and not fitting:
        roles = ["user", "item", "time", "rating"] + ["-"] * (n - 4)
        candidates.append(f"one event a line in {n} columns such as {','.join(roles[:n])} (--columns)")
    raise _refuse(path, f"{n} {sep}-separated column{'s' if n > 1 else ''} without a header", candidates)


def _refuse(path: Path, what: str, candidates: list[str]) -> DataError:
    could = f"; it could be {' or '.join(candidates)}" if candidates else ""
    return DataError(f"{path.name}: cannot tell the layout of {what}{could}. Say which with --format "
                     f"({', '.join(LAYOUTS)}) or --columns (the columns' roles in order, e.g. "
                     f"user,item,rating,time) ({path})")


def _kind(values: list[str]) -> str:
    """What every value of a column is: "int", "num", "behavior" (a Taobao behaviour) or "str"."""
    if all(_INT.fullmatch(v) for v in values):
        return "int"
    if all(_is_number(v) for v in values):
        return "num"
    if all(v.lower() in BEHAVIORS for v in values):
        return "behavior"
    return "str"


def _fits(kinds: list[str], signature: tuple[str, ...]) -> bool:
    return len(kinds) == len(signature) and all(
        k == s or (s == "num" and k == "int") for k, s in zip(kinds, signature, strict=False)
    )


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _from_header(path: Path, head: list[tuple[int, str]], delimiter: str, *, required: bool) -> Layout | None:
    """The layout that the first line names as a header of `COLUMN_NAMES`; None (or, when `required`, a
    refusal) when it names no known column."""
    lineno, line = head[0]
    names = _split(line, delimiter)
    roles = tuple(_ROLE_OF.get(n.lower(), "-") for n in names)
    if set(roles) == {"-"}:
        if not required:
            return None
        raise DataError(f"{path.name} line {lineno}: the header {','.join(names)} names no known column "
                        f"(known: {', '.join(_ROLE_OF)}); say which with --columns user=NAME,item=NAME ({path})")
    _check_roles(path, roles, names)
    if delimiter == "," and [n.lower() for n in names] == ["userid", "movieid", "rating", "timestamp"]:
        return replace(LAYOUTS["movielens-csv"], header_line=lineno)
    return Layout("csv", f"{_DELIMITER_NAMES[delimiter]}-separated, header {','.join(names)}", delimiter, lineno,
                  roles)


def _from_columns(path: Path, head: list[tuple[int, str]], delimiter: str,
                  columns: str | Mapping[str, str]) -> Layout:
    """The layout that `columns` gives: roles in order, or role=name pairs for a header (see `load_dataset`)."""
    sep = _DELIMITER_NAMES[delimiter]
    if isinstance(columns, str) and "=" not in columns:
        roles = tuple(_role(c) for c in columns.split(","))
        _check_roles(path, roles)
        header = _header_line(head, delimiter)
        return Layout("columns", f"{sep}-separated, {'header' if header else 'no header'}", delimiter, header, roles)
    if isinstance(columns, str):
        pairs = [c.split("=", 1) for c in columns.split(",")]
        if any(len(p) != 2 for p in pairs):
            raise DataError(f"columns {columns!r}: give every column as role=name, or only roles in order")
        columns = dict(pairs)
    wanted = {name.strip().lower(): _role(role) for role, name in columns.items()}
    lineno, line = head[0]
    names = _split(line, delimiter)
    missing = sorted(set(wanted) - {n.lower() for n in names})
    if missing:
        raise DataError(f"{path.name} line {lineno}: no column {', '.join(missing)} in header {','.join(names)} "
                        f"({path})")
    given = set(wanted.values())  # a role given by name is not also read off another known name
    known = (_ROLE_OF.get(n.lower(), "-") for n in names)
    roles = tuple(wanted.get(n.lower(), r if r not in given else "-") for n, r in zip(names, known, strict=True))
    _check_roles(path, roles, names)
    return Layout("csv", f"{sep}-separated, header {','.join(names)}", delimiter, lineno, roles)


def _role(text: str) -> str:
    """A column role from its name in `columns`: a role, a `COLUMN_NAMES` name, or "-"."""
    key = text.strip().lower()
    if key == "-" or key in ROLES:
        return key
    if key in _ROLE_OF:
        return _ROLE_OF[key]
    raise DataError(f"unknown column {text!r} in columns; use {', '.join(ROLES)}, a name such as "
                    f"{', '.join(_ROLE_OF)}, or - for a column to ignore")


def _check_roles(path: Path, roles: tuple[str, ...], names: list[str] | None = None) -> None:
    count = {role: roles.count(role) for role in ROLES}
    if count["user"] == count["item"] == 1 and count["time"] <= 1 and count["rating"] + count["action"] <= 1:
        return
    shown = ", ".join(roles if names is None else (f"{n}={r}" for n, r in zip(names, roles, strict=True)))
    raise DataError(f"{path.name}: columns {shown}: need one user and one item column, at most one time column "
                    f"and at most one rating or action column; say which with --columns ({path})")


# ------------------------------------------------------------------------------------------ reading tables

# The fast parse's column types: integer ids as numbers (strings on a retry when they are not); an action
# as a short string, since it may be a behaviour name (a longer value is cut, so it cannot be mistaken
# for a behaviour, and an action id cut to 8 digits is out of range).
_FAST_DTYPE = {"user": "i8", "item": "i8", "time": "i8", "rating": "f8", "action": "U8", "-": "U1"}
_VALID = {
    "user": bool,
    "item": bool,
    "-": lambda v: True,
    "time": lambda v: bool(_INT.fullmatch(v)),
    "rating": lambda v: _is_number(v) and 0 < float(v) <= 5,
    "action": lambda v: v.lower() in BEHAVIORS or (bool(_INT.fullmatch(v)) and 0 <= int(v) <= MAX_ACTION),
}
_EXPECTED = {
    "user": "an id",
    "item": "an id",
    "time": "an integer (unix seconds)",
    "rating": "a rating in (0, 5]",
    "action": f"an action id 0..{MAX_ACTION} or a behaviour ({', '.join(BEHAVIORS)})",
}


def _read_table(path: Path, layout: Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                                     np.ndarray | None, frozenset[int]]:
    """[n] users and items; ts and actions (int64, None without such a column); the engagement actions."""
    try:
        cols = _parse(path, layout)
        ts = cols["time"].astype(np.int64) if "time" in cols else None
        if "rating" in cols:
            actions, engagement = _rating_actions(cols["rating"].astype(np.float64)), RATING_ENGAGEMENT
        elif "action" in cols:
            actions, engagement = _action_ids(cols["action"])
        else:
            actions, engagement = None, frozenset()
    except DataError:
        raise
    except ValueError as e:
        _diagnose(path, layout)
        raise DataError(f"{path}: {e}") from e
    return cols["user"], cols["item"], ts, actions, engagement


def _parse(path: Path, layout: Layout) -> dict[str, np.ndarray]:
    """Role -> [n] column, by numpy's C parser: typed when ids are integers, else as strings."""
    source, delimiter = path, layout.delimiter
    if delimiter == "::":  # loadtxt's delimiter is one character: the ASCII unit separator, in no data file
        source, delimiter = io.StringIO(path.read_text(encoding="utf-8-sig").replace("::", "\x1f")), "\x1f"
    opts = dict(delimiter=None if delimiter == " " else delimiter, skiprows=layout.header_line, comments=None,
                encoding="utf-8-sig", quotechar='"' if delimiter == "," else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # about blank lines and an empty body, handled here
        try:
            fast = np.loadtxt(source, dtype=[(f"c{k}", _FAST_DTYPE[r]) for k, r in enumerate(layout.roles)],
                              ndmin=1, **opts)
            cols = [fast[f"c{k}"] for k in range(len(layout.roles))]
        except ValueError:
            if isinstance(source, io.StringIO):
                source.seek(0)
            table = np.char.strip(np.loadtxt(source, dtype=str, ndmin=2, **opts))
            if len(table) and table.shape[1] != len(layout.roles):
                raise ValueError(f"expected {len(layout.roles)} columns, found {table.shape[1]}") from None
            cols = list(table.T) if len(table) else [table.reshape(-1)] * len(layout.roles)
            if any((np.char.str_len(cols[layout.roles.index(r)]) == 0).any() for r in ("user", "item")):
                raise ValueError("an empty user or item id") from None
    if not len(cols[0]):
        where = f"line {layout.header_line + 1}: no events after the header" if layout.header_line else "no events"
        raise DataError(f"{path.name} {where} ({path})")
    return {role: col for role, col in zip(layout.roles, cols, strict=True) if role != "-"}


def _rating_actions(ratings: np.ndarray) -> np.ndarray:
    """[n] star ratings in (0, 5] -> action ids round(2 * rating), 1..10."""
    if not ((ratings > 0) & (ratings <= 5)).all():
        raise ValueError("a rating outside (0, 5]; give the column as an action with --columns to keep its values")
    return np.rint(ratings * 2).astype(np.int64)


def _action_ids(values: np.ndarray) -> tuple[np.ndarray, frozenset[int]]:
    """[n] behaviour names (`BEHAVIORS`) or action ids -> int64 ids and the engagement ids they imply."""
    names, inverse = np.unique(np.char.lower(values), return_inverse=True)
    inverse = inverse.reshape(-1)
    if all(n in BEHAVIORS for n in names.tolist()):
        return np.array([BEHAVIORS[n] for n in names.tolist()], dtype=np.int64)[inverse], BEHAVIOR_ENGAGEMENT
    try:
        ids = names.astype(np.int64)
    except ValueError:
        raise ValueError(f"the action column mixes behaviours ({', '.join(BEHAVIORS)}) and other values "
                         f"({', '.join(n for n in names.tolist()[:5] if n not in BEHAVIORS)})") from None
    if ids.min() < 0 or ids.max() > MAX_ACTION:
        raise ValueError(f"an action id outside 0..{MAX_ACTION}")
    return ids[inverse], frozenset()


def _diagnose(path: Path, layout: Layout) -> None:
    """Raise a `DataError` naming the first line that does not fit `layout` (a slow pass, on errors only)."""
    n = len(layout.roles)
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if lineno <= layout.header_line or not (line.split() if layout.delimiter == " " else line):
                continue  # the lines numpy skips: empty ones, and blank ones between whitespace-separated fields
            fields = _split(line, layout.delimiter)
            if len(fields) != n:
                raise DataError(f"{path.name} line {lineno}: expected {n} fields ({', '.join(layout.roles)}), "
                                f"got {len(fields)} ({path})")
            for k, (role, value) in enumerate(zip(layout.roles, fields, strict=True)):
                if not _VALID[role](value):
                    raise DataError(f"{path.name} line {lineno}: column {k + 1} ({role}) is not "
                                    f"{_EXPECTED[role]}: {value!r} ({path})")


def _read_lines(path: Path, header_line: int) -> tuple[np.ndarray, np.ndarray]:
    """[n] users and items from `uid i1 i2 ...` lines after the header, if any; file order is time order."""
    users: list[str] = []
    items: list[str] = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields or lineno <= header_line:
                continue
            if len(fields) < 2:
                raise DataError(f"{path.name} line {lineno}: expected a user id and at least one item, "
                                f"got {len(fields)} field ({path})")
            users.extend([fields[0]] * (len(fields) - 1))
            items.extend(fields[1:])
    if not users:
        raise DataError(f"{path.name} line 1: empty file, no events ({path})")
    return np.array(users), np.array(items)



def save_events_csv(ds: Dataset, path: str | os.PathLike) -> None:
    """Write `user_id,item_id,timestamp,action` rows with external ids, readable by `load_dataset`."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp", "action"])
        for uid, s in zip(ds.user_ids, ds.seqs, strict=True):
            w.writerows(
                (uid, ds.item_ids[i], t, a)
                for i, t, a in zip(s.items.tolist(), s.ts.tolist(), s.actions.tolist(), strict=True)
            )


def save_item_map(ds: Dataset, path: str | os.PathLike) -> None:
    """Save the external item ids (index = internal id) beside a model, as a JSON list."""
    Path(path).write_text(json.dumps(ds.item_ids))


def load_item_map(path: str | os.PathLike) -> list[str]:
    ids = json.loads(Path(path).read_text())
    if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
        raise DataError(f"{path}: expected a JSON list of item id strings")
    return ids


# ----------------------------------------------------------------------------------------------- splits


@dataclass
class EvalCase:
    """One next-item prediction: from `history`, predict item `target` (internal id) at time `target_ts`."""

    user_index: int
    history: Events
    target: int
    target_ts: int


@dataclass
class LooSplit:
    """Leave-one-out split. `train[u]` is user u's training sequence (aligned with `Dataset.seqs`)."""

    train: list[Events]
    valid: list[EvalCase]  # history seq[:-2], target seq[-2]
    test: list[EvalCase]  # history seq[:-1], target seq[-1]


def holdout_users(ds: Dataset, fraction: float) -> frozenset[int]:
    """The users (indices into `ds.seqs`) that `kvrec train --holdout-users fraction` keeps out of
    training: the round(fraction x users) whose ids hash lowest.

    A replay of training users scores predictions of events the model was fitted to, which rewards
    memorising over generalising and can reorder models (a model's replay accuracy on its own training
    data need not follow its accuracy on new users). The rule depends on the user ids alone, so a
    benchmark finds the same users from the dataset and the fraction the checkpoint records, whatever
    the order of the file, and a smaller fraction's users are among a larger one's: the users held out
    by several models trained with different fractions are those of the smallest.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    rank = sorted(range(len(ds.user_ids)),
                  key=lambda u: hashlib.blake2b(f"kvrec-holdout:{ds.user_ids[u]}".encode(), digest_size=8).digest())
    return frozenset(rank[:round(fraction * len(rank))])


def leave_one_out(ds: Dataset, skip: frozenset[int] = frozenset()) -> LooSplit:
    """The standard SASRec protocol: the last event is the test target, the one before it validation.

    Users with fewer than 3 events cannot give both a non-empty history and two targets: their whole
    sequence goes to training and they are not evaluated. Users in `skip` (held out) are left out.
    """
    train, valid, test = [], [], []
    for u, s in enumerate(ds.seqs):
        if u in skip:
            continue
        if len(s) < 3:
            train.append(s)
            continue
        train.append(s[:-2])
        valid.append(EvalCase(u, s[:-2], int(s.items[-2]), int(s.ts[-2])))
        test.append(EvalCase(u, s[:-1], int(s.items[-1]), int(s.ts[-1])))
    return LooSplit(train, valid, test)


@dataclass
class StreamUser:
    """A user for replay: `prefix` is pre-loaded as the user's state, `future` arrives as requests."""

    user_index: int
    user_id: str
    prefix: Events
    future: Events


def stream_split(
    ds: Dataset,
    *,
    fraction: float | None = 0.5,
    cut_time: int | None = None,
    min_prefix: int = 1,
    min_future: int = 1,
    users: frozenset[int] | None = None,
) -> list[StreamUser]:
    """Cut each history into prefix and future: at global time `cut_time` (events with ts < cut_time
    form the prefix) or, when `cut_time` is None, after the first round(fraction * len) events.

    Users whose prefix or future would be shorter than `min_prefix` / `min_future` are skipped, and with
    `users` (indices, e.g. `holdout_users`) every user not among them.
    """
    if cut_time is None and (fraction is None or not 0.0 <= fraction <= 1.0):
        raise ValueError(f"give cut_time, or a fraction in [0, 1] (got {fraction})")
    out = []
    for u, s in enumerate(ds.seqs):
        if users is not None and u not in users:
            continue
        if cut_time is not None:
            k = int(torch.searchsorted(s.ts, torch.tensor(cut_time)))  # ts is sorted within a user
        else:
            k = round(fraction * len(s))
        if k >= min_prefix and len(s) - k >= min_future:
            out.append(StreamUser(u, ds.user_ids[u], s[:k], s[k:]))
    return out
