"""The corpus in tests/data_layouts/: one small file per layout, read right, and one per ambiguity, refused
with its candidates named and then read as `format`/`columns` say.

Expected events are worked out by hand from each file: per user (external id), its (item, ts, action)
in order, with ts the event index where a layout has no time. Comparing whole histories catches a file
read in the wrong layout (u.data as one-user-per-line lines, Taobao's category as the item, a timestamp
as a rating), events out of time order, ties out of file order, and actions mapped wrongly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kvrec.models import data_cli
from kvrec.models.data import (
    BEHAVIOR_ENGAGEMENT,
    LAYOUTS,
    RATING_ENGAGEMENT,
    DataError,
    load_dataset,
)

from kvrec.cli import main

CORPUS = Path(__file__).parent / "data_layouts"


def histories(ds) -> dict[str, list[tuple[str, int, int]]]:
    return {
        uid: [(ds.item_ids[i], t, a) for i, t, a in zip(s.items.tolist(), s.ts.tolist(), s.actions.tolist(),
                                                        strict=True)]
        for uid, s in zip(ds.user_ids, ds.seqs, strict=True)
    }


READABLE = [
    # u.data: ratings 1..5 become 2..10; 186's two events tie in time and keep file order
    ("u.data", "movielens-100k", True, RATING_ENGAGEMENT, {
        "196": [("51", 881250900, 4), ("242", 881250949, 6)],
        "186": [("302", 891717742, 6), ("346", 891717742, 10)],
        "22": [("51", 878887000, 8), ("377", 878887116, 2)],
    }),
    ("ratings.dat", "movielens-dat", True, RATING_ENGAGEMENT, {
        "1": [("1193", 978300760, 10), ("661", 978302109, 6)],
        "2": [("1193", 978298413, 8), ("3068", 978299000, 8)],
    }),
    ("ratings.csv", "movielens-csv", True, RATING_ENGAGEMENT, {  # half stars: 4.5 -> 9, 0.5 -> 1
        "1": [("1061", 1260759100, 9), ("31", 1260759144, 5), ("1029", 1260759179, 6)],
        "2": [("31", 1260759200, 1)],
    }),
    # the category column (2520377, 149192) is no item; pv 1, cart 2, fav 3, buy 4; user 1's tie in file order
    ("UserBehavior.csv", "taobao", True, BEHAVIOR_ENGAGEMENT, {
        "1": [("2268318", 1511544070, 1), ("2576651", 1511544070, 4), ("2333346", 1511561733, 2)],
        "2": [("2268318", 1511500000, 3), ("2576651", 1511572885, 1)],
    }),
    ("lines.txt", "lines", False, frozenset(), {
        "1": [("10", 0, 0), ("11", 1, 0), ("12", 2, 0)],
        "2": [("11", 0, 0), ("13", 1, 0)],
        "3": [("14", 0, 0)],
    }),
    ("lines-equal-length.txt", "lines", False, frozenset(), {  # string items: no column is a time or rating
        "u1": [("a", 0, 0), ("b", 1, 0), ("c", 2, 0)],
        "u2": [("b", 0, 0), ("d", 1, 0), ("e", 2, 0)],
    }),
    ("pairs.txt", "pairs", False, frozenset(), {
        "u1": [("x", 0, 0), ("z", 1, 0), ("x", 2, 0)],
        "u2": [("y", 0, 0)],
    }),
    ("userID-movieID.csv", "csv", False, frozenset(), {  # the plain header, in its own case
        "5": [("100", 0, 0), ("200", 1, 0)],
        "6": [("100", 0, 0)],
    }),
    ("headed.tsv", "csv", True, BEHAVIOR_ENGAGEMENT, {  # UID, IID, Time, Behavior; string ids
        "a": [("q", 10, 1), ("p", 30, 4)],
        "b": [("p", 20, 2)],
    }),
]


@pytest.mark.parametrize(("file", "layout", "has_time", "engagement", "expected"), READABLE,
                         ids=[r[0] for r in READABLE])
def test_each_layout_is_recognised_and_read_right(file, layout, has_time, engagement, expected):
    ds = load_dataset(CORPUS / file)
    assert ds.layout.name == layout
    assert histories(ds) == expected
    assert ds.has_time == has_time and ds.engagement_actions == engagement
    named = load_dataset(CORPUS / file, format=layout)  # saying the layout reads the same
    assert named.layout == ds.layout and named.fingerprint() == ds.fingerprint()


AMBIGUOUS = [
    ("ambiguous-pairs-or-lines.txt", ["pairs", "lines"], {"format": "pairs"}, {
        "1": [("10", 0, 0)], "2": [("11", 0, 0)], "3": [("12", 0, 0)],
    }),
    ("ambiguous-pairs-or-lines.txt", ["pairs", "lines"], {"format": "lines"}, {
        "1": [("10", 0, 0)], "2": [("11", 0, 0)], "3": [("12", 0, 0)],
    }),
    ("ambiguous-lines-or-table.txt", ["lines", "user,item,time"], {"columns": "user,item,time"}, {
        "1": [("10", 1260759144, 0)], "2": [("11", 1260759179, 0)],
    }),
    ("ambiguous-lines-or-table.txt", ["lines", "user,item,time"], {"format": "lines"}, {
        "1": [("10", 0, 0), ("1260759144", 1, 0)], "2": [("11", 0, 0), ("1260759179", 1, 0)],
    }),
    # u.data with spaces: 4 whitespace-separated numbers are also a user with 3 items
    ("ambiguous-udata-with-spaces.txt", ["movielens-100k", "lines (one user a line) with 3 items"],
     {"columns": "user,item,rating,time"}, {
        "196": [("51", 881250900, 4), ("242", 881250949, 6)], "186": [("302", 891717742, 6)],
    }),
    ("ambiguous-ratings-without-header.csv", ["movielens-dat or movielens-100k with comma separators"],
     {"columns": "userId,movieId,rating,timestamp"}, {
        "1": [("31", 1260759144, 5), ("1029", 1260759179, 6)], "2": [("31", 1260759200, 8)],
    }),
    ("ambiguous-unknown-header.csv", ["looks like a header (who, what, when)"],
     {"columns": "user=who,item=what,time=when"}, {"A": [("2", 2, 0), ("1", 5, 0)], "B": [("2", 1, 0)]}),
    ("ambiguous-unknown-header.csv", ["looks like a header (who, what, when)"],
     {"columns": {"user": "WHO", "item": "what"}, "format": "csv"}, {"A": [("1", 0, 0), ("2", 1, 0)],
                                                                     "B": [("2", 0, 0)]}),
]


@pytest.mark.parametrize(("file", "named", "override", "expected"), AMBIGUOUS,
                         ids=[f"{r[0]}-{next(iter(r[2].values()))}" for r in AMBIGUOUS])
def test_an_ambiguous_file_is_refused_naming_its_candidates_and_read_as_told(file, named, override, expected):
    with pytest.raises(DataError, match="cannot tell the layout|looks like a header") as refused:
        load_dataset(CORPUS / file)
    assert all(candidate in str(refused.value) for candidate in named), str(refused.value)
    assert histories(load_dataset(CORPUS / file, **override)) == expected


def test_positional_columns_skip_a_known_header_and_ignore_dash_columns():
    ds = load_dataset(CORPUS / "ratings.csv", columns="user,item,-,time")
    assert ds.layout.name == "columns" and not ds.has_action and ds.engagement_actions == frozenset()
    assert histories(ds)["1"] == [("1061", 1260759100, 0), ("31", 1260759144, 0), ("1029", 1260759179, 0)]


def test_a_named_layout_skips_a_header_naming_known_columns_and_needs_one_where_it_has_one(tmp_path):
    headed = tmp_path / "pairs.txt"
    headed.write_text("user item\nu1 x\nu1 y\n")
    assert histories(load_dataset(headed, format="pairs")) == {"u1": [("x", 0, 0), ("y", 1, 0)]}
    assert histories(load_dataset(headed, format="lines")) == {"u1": [("x", 0, 0), ("y", 1, 0)]}
    with pytest.raises(DataError, match="line 1: movielens-csv has a header naming its columns, this line names none"):
        load_dataset(CORPUS / "ambiguous-ratings-without-header.csv", format="movielens-csv")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"columns": "user,item"}, "u.data line 1: expected 2 fields \\(user, item\\), got 4"),
        ({"columns": "user,item,price,time"}, "unknown column 'price'"),
        ({"columns": "user,uid,rating,time"}, "need one user and one item column"),
        ({"columns": "user,item,rating,time", "format": "lines"}, "not both"),
        ({"format": "movielens-dat"}, "u.data line 1: expected 4 fields"),
        ({"format": "csv"}, "names no known column"),
        ({"format": "tsv"}, "unknown format 'tsv'; known: movielens-csv"),
    ],
)
def test_a_wrong_format_or_columns_is_refused(kwargs, message):
    with pytest.raises(DataError, match=message):
        load_dataset(CORPUS / "u.data", **kwargs)


def test_cli_stats_says_which_layout_it_read(capsys):
    assert main(["data", "stats", str(CORPUS / "u.data")]) == 0
    out = capsys.readouterr().out
    assert "layout       movielens-100k (" in out
    assert "users        3\n" in out and "items        5\n" in out and "events       6\n" in out
    assert "engagement   actions 8, 9, 10: 2 events" in out  # ratings 5 and 4 of six
    assert main(["data", "stats", str(CORPUS / "UserBehavior.csv")]) == 0
    assert "actions      1: 2, 2: 1, 3: 1, 4: 1\n" in capsys.readouterr().out


def test_cli_refuses_an_ambiguous_file_and_takes_format_and_columns(capsys):
    spaced = str(CORPUS / "ambiguous-udata-with-spaces.txt")
    assert main(["data", "stats", spaced]) == 2
    err = capsys.readouterr().err
    assert "cannot tell the layout" in err and "movielens-100k" in err and "lines" in err
    assert main(["data", "stats", spaced, "--columns", "user,item,rating,time"]) == 0
    out = capsys.readouterr().out
    assert "layout       columns (" in out and "users        2\n" in out and "items        3\n" in out
    assert main(["data", "stats", str(CORPUS / "ambiguous-pairs-or-lines.txt"), "--format", "pairs"]) == 0
    assert "users        3\n" in capsys.readouterr().out


def test_cli_format_choices_are_the_layouts():
    assert data_cli.LAYOUT_NAMES == tuple(LAYOUTS)
