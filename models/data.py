"""Interaction datasets: loading every supported file format into one `Dataset`, and the splits.

Every format ends in the same place, `build_dataset`, so ordering rules live in one spot: each user's
events are sorted by time with ties kept in file order, users keep their order of first appearance, and
items get contiguous internal ids in order of first appearance after that sort. The result is
deterministic, so a model's item map and a dataset fingerprint are reproducible across runs.

Formats (`fmt`, detected from the file when None):
  movielens-csv  `ratings.csv`, header `userId,movieId,rating,timestamp` (ml-latest-small, ml-20m, ml-25m)
  movielens-dat  `ratings.dat`, `UserID::MovieID::Rating::Timestamp`, no header (ml-1m, ml-10m)
  lines          one user a line, `uid i1 i2 ...`, chronological, no time (LastFM.txt, Beauty.txt)
  pairs          one event a line, `uid iid`, file order is time order
  csv            any CSV with a header naming the user, item and optional time/action columns
A `.txt` file is read as `pairs` when every line has two fields and some user id occurs on several lines.

MovieLens ratings (0.5..5) become actions round(2 * rating) in 1..10; 0 means "no action".
The MovieLens readers use numpy's C parser (about 1 s per million rows), which keeps ml-25m feasible;
when it rejects a file, a slow line-by-line pass finds the offending line for the error message.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from kvrec.models.state import Events

FORMATS = ("movielens-csv", "movielens-dat", "lines", "pairs", "csv")
_DIR_CANDIDATES = ("ratings.csv", "ratings.dat", "events.csv", "*.txt")
_NON_SPACE = re.compile(r"\S")


class DataError(ValueError):
    """Unreadable, malformed or empty input; the message names the file (and line, where there is one)."""


@dataclass
class Dataset:
    """Per-user event sequences with internal ids; `user_ids[u]` and `item_ids[i]` are the external ids."""

    name: str
    user_ids: list[str]
    item_ids: list[str]
    seqs: list[Events]
    has_time: bool  # False: ts is the event index within the user
    has_action: bool

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
    return Dataset(name, user_ids, item_ids, seqs, has_time=ts is not None, has_action=has_action)


def _rank_by_first(first: np.ndarray) -> np.ndarray:
    """[k] first-row index of each unique value -> [k] its rank in order of first appearance."""
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank


# ---------------------------------------------------------------------------------------------- loading


def datasets_root() -> Path:
    """Folder of the named datasets: `$KVREC_DATASETS`, else `../shared/datasets` beside the project."""
    env = os.environ.get("KVREC_DATASETS")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def load_dataset(
    source: str | os.PathLike,
    *,
    fmt: str | None = None,
    min_len: int = 1,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
    action_col: str = "action",
) -> Dataset:
    """Load a file, a folder holding one, a dataset name under `datasets_root()`, or a synth spec.

    Synth specs (`synth-long`, `synth-short:users=100,mean_len=50`) are generated in memory. The column
    names only apply to the generic `csv` format.
    """
    text = str(source)
    if text.startswith("synth") and not Path(text).exists():
        from kvrec.models import synth

        return synth.from_spec(text)
    path, name = _resolve(text)
    fmt = fmt or _detect(path)
    if fmt in ("movielens-csv", "movielens-dat"):
        users, items, ts, actions = _read_movielens(path, dat=fmt == "movielens-dat")
    elif fmt in ("lines", "pairs"):
        users, items = _read_tokens(path, pairs=fmt == "pairs")
        ts = actions = None
    elif fmt == "csv":
        users, items, ts, actions = _read_csv(path, user_col, item_col, time_col, action_col)
    else:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    return build_dataset(name, users, items, ts, actions, min_len=min_len, source=str(path))


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


def _detect(path: Path) -> str:
    """Format from the file name and, for CSV and text files, the first lines."""
    if path.suffix == ".dat":
        return "movielens-dat"
    with open(path, encoding="utf-8", errors="replace") as f:
        head = [line for line in (f.readline() for _ in range(1000)) if line.strip()]
    if not head:
        raise DataError(f"{path} line 1: empty file, no events")
    if path.suffix == ".csv":
        cols = [c.strip() for c in head[0].split(",")]
        return "movielens-csv" if cols[:2] == ["userId", "movieId"] else "csv"
    fields = [line.split() for line in head]
    uids = [f[0] for f in fields]
    pairs = all(len(f) == 2 for f in fields) and len(set(uids)) < len(uids)
    return "pairs" if pairs else "lines"


def _read_movielens(path: Path, *, dat: bool) -> tuple[np.ndarray, ...]:
    """[n] users, items, ts (int64) and actions = round(2 * rating), via numpy's C parser."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    header = 0 if dat else 1
    body = raw.find("\n") + 1 if header else 0
    if not _NON_SPACE.search(raw, body):
        where = "line 2: no events after the header" if header and body else "line 1: empty file, no events"
        raise DataError(f"{path.name} {where} ({path})")
    if dat:
        raw = raw.replace("::", ",")
    try:
        table = np.loadtxt(io.StringIO(raw), delimiter=",", skiprows=header, ndmin=2, dtype=np.float64)
    except ValueError as e:
        _diagnose(path, raw, header, 4)
        raise DataError(f"{path}: {e}") from e
    if table.shape[1] != 4:
        _diagnose(path, raw, header, 4)
    users, items, ts = (table[:, c].astype(np.int64) for c in (0, 1, 3))
    return users, items, ts, np.rint(table[:, 2] * 2).astype(np.int64)


def _diagnose(path: Path, raw: str, header: int, ncols: int) -> None:
    """Raise a `DataError` naming the first line that is not `ncols` numbers."""
    for lineno, line in enumerate(raw.splitlines()[header:], start=header + 1):
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) != ncols:
            raise DataError(f"{path.name} line {lineno}: expected {ncols} fields, got {len(fields)} ({path})")
        for field in fields:
            try:
                float(field)
            except ValueError:
                bad = field.strip()
                raise DataError(f"{path.name} line {lineno}: not a number: {bad!r} ({path})") from None


def _read_tokens(path: Path, *, pairs: bool) -> tuple[np.ndarray, np.ndarray]:
    """[n] users and items from `uid i1 i2 ...` lines, or `uid iid` pairs; file order is time order."""
    users: list[str] = []
    items: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2 or (pairs and len(fields) != 2):
                want = "2 fields (user item)" if pairs else "a user id and at least one item"
                raise DataError(f"{path.name} line {lineno}: expected {want}, got {len(fields)} ({path})")
            users.extend([fields[0]] * (len(fields) - 1))
            items.extend(fields[1:])
    if not users:
        raise DataError(f"{path.name} line 1: empty file, no events ({path})")
    return np.array(users), np.array(items)


def _read_csv(
    path: Path, user_col: str, item_col: str, time_col: str, action_col: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """[n] users and items (strings), ts and actions (int64, None when the column is absent)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [c.strip() for c in next(reader, [])]
        if not header:
            raise DataError(f"{path.name} line 1: empty file, no header ({path})")
        missing = [c for c in (user_col, item_col) if c not in header]
        if missing:
            raise DataError(f"{path.name} line 1: no column {', '.join(missing)} in header {header} ({path})")
        cols = [header.index(c) if c in header else None for c in (user_col, item_col, time_col, action_col)]
        out: list[list[str]] = [[] for _ in cols]
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path.name} line {reader.line_num}: expected {len(header)} fields, "
                    f"got {len(row)} ({path})"
                )
            for dst, c in zip(out, cols, strict=True):
                if c is not None:
                    dst.append(row[c])
        if not out[0]:
            raise DataError(f"{path.name} line 2: no events after the header ({path})")
    ints = [_ints(path, out[k], header[cols[k]]) if cols[k] is not None else None for k in (2, 3)]
    return np.array(out[0]), np.array(out[1]), ints[0], ints[1]


def _ints(path: Path, values: list[str], column: str) -> np.ndarray:
    """[n] int64 of a time or action column; a bad value is reported with its line (header is line 1)."""
    try:
        return np.array(values, dtype=np.int64)
    except ValueError:
        for row, v in enumerate(values):
            try:
                int(v)
            except ValueError:
                raise DataError(
                    f"{path.name} line {row + 2}: column {column} is not an integer: {v!r} ({path})"
                ) from None
        raise


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


def leave_one_out(ds: Dataset) -> LooSplit:
    """The standard SASRec protocol: the last event is the test target, the one before it validation.

    Users with fewer than 3 events cannot give both a non-empty history and two targets: their whole
    sequence goes to training and they are not evaluated.
    """
    train, valid, test = [], [], []
    for u, s in enumerate(ds.seqs):
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
) -> list[StreamUser]:
    """Cut each history into prefix and future: at global time `cut_time` (events with ts < cut_time
    form the prefix) or, when `cut_time` is None, after the first round(fraction * len) events.

    Users whose prefix or future would be shorter than `min_prefix` / `min_future` are skipped.
    """
    if cut_time is None and (fraction is None or not 0.0 <= fraction <= 1.0):
        raise ValueError(f"give cut_time, or a fraction in [0, 1] (got {fraction})")
    out = []
    for u, s in enumerate(ds.seqs):
        if cut_time is not None:
            k = int(torch.searchsorted(s.ts, torch.tensor(cut_time)))  # ts is sorted within a user
        else:
            k = round(fraction * len(s))
        if k >= min_prefix and len(s) - k >= min_future:
            out.append(StreamUser(u, ds.user_ids[u], s[:k], s[k:]))
    return out
