"""Loading every format, ordering rules, errors, the real datasets, and the splits."""

from __future__ import annotations

import pytest
import torch
from kvrec.models.data import (
    BEHAVIOR_ENGAGEMENT,
    BEHAVIORS,
    RATING_ENGAGEMENT,
    DataError,
    build_dataset,
    datasets_root,
    leave_one_out,
    load_dataset,
    load_item_map,
    save_events_csv,
    save_item_map,
    stream_split,
)

from kvrec.cli import main

ML_HEADER = "userId,movieId,rating,timestamp\n"
needs_shared = pytest.mark.skipif(not datasets_root().is_dir(), reason="shared datasets not present")


def write(path, text):
    path.write_text(text)
    return path


def test_movielens_csv_sorts_by_time_keeping_file_order_on_ties(tmp_path):
    f = write(
        tmp_path / "ratings.csv",
        "userId,movieId,rating,timestamp\n"
        "7,10,4.0,300\n7,20,3.5,100\n7,30,5.0,100\n3,20,0.5,50\n",
    )
    ds = load_dataset(f)
    assert ds.user_ids == ["7", "3"]  # order of first appearance
    assert ds.item_ids == ["20", "30", "10", "20"][:3]  # first appearance after sorting by time
    assert ds.seqs[0].items.tolist() == [0, 1, 2]  # 20 and 30 tie at t=100: file order kept
    assert ds.seqs[0].ts.tolist() == [100, 100, 300]
    assert ds.seqs[0].actions.tolist() == [7, 10, 8]  # round(2 * rating)
    assert ds.seqs[1].actions.tolist() == [1]
    assert ds.has_time and ds.has_action
    assert ds.num_items == 3 and ds.num_events == 4


def test_movielens_dat_format_and_folder_detection(tmp_path):
    write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    write(tmp_path / "README.txt", "not data")
    ds = load_dataset(tmp_path)
    assert ds.name == tmp_path.name
    assert ds.item_ids == ["1193", "661"]
    assert [s.items.tolist() for s in ds.seqs] == [[0, 1], [0]]
    assert ds.seqs[0].actions.tolist() == [10, 6]


def test_lines_format_uses_event_index_as_time(tmp_path):
    ds = load_dataset(write(tmp_path / "Beauty.txt", "u1 a b c\nu2 b d\n"))
    assert ds.name == "Beauty" and not ds.has_time and not ds.has_action
    assert ds.item_ids == ["a", "b", "c", "d"]
    assert ds.seqs[1].items.tolist() == [1, 3]
    assert ds.seqs[0].ts.tolist() == [0, 1, 2] and ds.seqs[1].ts.tolist() == [0, 1]


def test_pairs_format_is_detected_and_keeps_file_order(tmp_path):
    ds = load_dataset(write(tmp_path / "pairs.txt", "u1 x\nu2 y\nu1 z\nu1 x\n"))
    assert ds.user_ids == ["u1", "u2"]
    assert ds.item_ids == ["x", "z", "y"]  # first appearance after grouping by user
    assert ds.seqs[0].items.tolist() == [0, 1, 0]
    assert ds.seqs[0].ts.tolist() == [0, 1, 2]


def test_generic_csv_with_named_columns_and_min_len(tmp_path):
    f = write(tmp_path / "log.csv", "who,what,when,kind\nA,p,5,1\nB,q,1,2\nA,q,2,0\nA,r,9,3\n")
    ds = load_dataset(f, columns="user=who,item=what,time=when,action=kind", min_len=2)
    assert ds.user_ids == ["A"]  # B has one event
    assert ds.item_ids == ["q", "p", "r"]  # contiguous over the users kept
    assert ds.seqs[0].ts.tolist() == [2, 5, 9] and ds.seqs[0].actions.tolist() == [0, 1, 3]
    assert ds.engagement_actions == frozenset()  # raw action ids: nothing known about engagement
    no_time = load_dataset(f, columns={"user": "who", "item": "what"})
    assert not no_time.has_time and not no_time.has_action
    assert no_time.seqs[0].items.tolist() == [0, 1, 2]  # file order: p, q, r


def test_known_header_names_in_any_case_and_named_columns_win(tmp_path):
    f = write(tmp_path / "log.csv", "User_ID,ITEM,Ts,visitor,rating\n1,a,9,v1,4.0\n1,b,3,v1,2.0\n")
    ds = load_dataset(f)
    assert ds.layout.roles == ("user", "item", "time", "-", "rating")
    assert ds.item_ids == ["b", "a"] and ds.seqs[0].actions.tolist() == [4, 8]
    by_visitor = load_dataset(f, columns="user=visitor")  # User_ID is then no user column
    assert by_visitor.layout.roles == ("-", "item", "time", "user", "rating") and by_visitor.user_ids == ["v1"]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("ratings.csv", f"{ML_HEADER}1,2,3.0,4\n1,2\n", r"ratings.csv line 3: expected 4 fields .*, got 2"),
        ("ratings.csv", f"{ML_HEADER}1,2,x,4\n", r"ratings.csv line 2: column 3 \(rating\) is not a rating .*'x'"),
        ("ratings.csv", f"{ML_HEADER}1,2,7,4\n", r"ratings.csv line 2: column 3 \(rating\) is not a rating in"),
        ("ratings.csv", f"{ML_HEADER}1,2,3.0,4\n  \n", r"ratings.csv line 3: expected 4 fields .*, got 1"),
        ("ratings.dat", "1::2::3::4\n5::6\n", r"ratings.dat: cannot tell .*line 2: 2\)"),
        ("ratings.csv", "", "ratings.csv line 1: empty"),
        ("ratings.csv", ML_HEADER, "ratings.csv line 2: no events"),
        ("data.txt", "u1\n", "data.txt: cannot tell the layout of 1 whitespace-separated column"),
        ("events.csv", "user_id,item_id,timestamp\na,b,1\na,c,soon\n", r"events.csv line 3: column 3 \(time\)"),
        ("events.csv", "user_id,item_id\na,\n", r"events.csv line 2: column 2 \(item\) is not an id"),
        ("events.csv", "visitor,product\nv,p\n", "events.csv: cannot tell the layout of 2 comma-separated"),
        ("events.csv", "uid,user,item\n1,2,3\n", "events.csv: columns uid=user, user=user, item=item: need one"),
        ("log.csv", "1,7,0,click,5\n", "log.csv: cannot tell the layout of 5 comma-separated columns"),
        ("log.csv", "user,item,action\n1,2,pv\n1,3,3\n", r"action column mixes behaviours .* other values \(3\)"),
        ("log.csv", "user,item,action\n1,2,123456789\n", r"log.csv line 2: column 3 \(action\) is not an action id"),
    ],
)
def test_malformed_input_names_file_and_line(tmp_path, name, text, message):
    with pytest.raises(DataError, match=message):
        load_dataset(write(tmp_path / name, text))


def test_a_taobao_file_with_an_unknown_behaviour_is_refused_at_its_line(tmp_path):
    f = write(tmp_path / "UserBehavior.csv", "1,7,0,pv,5\n1,8,0,click,6\n")
    with pytest.raises(DataError, match=r"line 2: column 4 \(action\) .* \(pv, cart, fav, buy\): 'click'"):
        load_dataset(f, format="taobao")


def test_missing_source_lists_what_was_looked_for(tmp_path):
    with pytest.raises(DataError, match="looked for"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"ratings.csv, ratings.dat, u.data, events.csv, \*.txt, \*.csv"):
        load_dataset(tmp_path)


def test_folders_of_movielens_100k_and_taobao_resolve_to_their_data_file(tmp_path):
    ml = tmp_path / "ml-100k"
    ml.mkdir()
    write(ml / "u.data", "196\t242\t3\t881250949\n")
    write(ml / "u.item", "242|Kolya (1996)|24-Jan-1997\n")
    ds = load_dataset(ml)
    assert ds.name == "ml-100k" and ds.layout.name == "movielens-100k" and ds.item_ids == ["242"]
    taobao = tmp_path / "taobao"
    taobao.mkdir()
    write(taobao / "UserBehavior.csv", "1,7,0,buy,5\n")
    ds = load_dataset(taobao)
    assert ds.name == "taobao" and ds.layout.name == "taobao" and ds.seqs[0].actions.tolist() == [4]


def test_fingerprint_item_map_and_csv_round_trip(tmp_path):
    ds = build_dataset("x", torch.tensor([1, 1, 2]).numpy(), torch.tensor([5, 6, 5]).numpy(),
                       torch.tensor([10, 20, 30]).numpy(), torch.tensor([0, 2, 0]).numpy())
    save_events_csv(ds, tmp_path / "events.csv")
    again = load_dataset(tmp_path)
    assert again.fingerprint() == ds.fingerprint() and again.name == tmp_path.name
    save_item_map(ds, tmp_path / "items.json")
    assert load_item_map(tmp_path / "items.json") == ds.item_ids == ["5", "6"]
    assert ds.item_index() == {"5": 0, "6": 1}
    other = build_dataset("x", torch.tensor([1, 1, 2]).numpy(), torch.tensor([5, 6, 5]).numpy(),
                          torch.tensor([10, 21, 30]).numpy())
    assert other.fingerprint() != ds.fingerprint()


@needs_shared
@pytest.mark.parametrize(
    ("name", "layout", "users", "items", "events"),
    [
        ("ml-latest-small", "movielens-csv", 671, 9066, 100_004),
        ("lastfm", "lines", 1090, 3646, 52_551),
        ("amazon-beauty", "lines", 22_363, 12_101, 198_502),
        ("taobao-userbehavior-sample", "taobao", 814, 55_233, 84_287),
    ],
)
def test_real_datasets_match_their_readme(name, layout, users, items, events):
    ds = load_dataset(name)
    stats = ds.stats()
    assert ds.layout.name == layout
    assert (stats["users"], stats["items"], stats["events"]) == (users, items, events)
    assert all(bool((s.ts[1:] >= s.ts[:-1]).all()) for s in ds.seqs)
    if name == "ml-latest-small":
        assert (stats["median_len"], stats["p90_len"], stats["max_len"]) == (71, 323, 2391)
        assert ds.fingerprint() == load_dataset(datasets_root() / name / "ratings.csv").fingerprint()
        assert ds.engagement_actions == RATING_ENGAGEMENT
    if name == "taobao-userbehavior-sample":  # the README's behaviour counts: pv, cart, fav, buy
        actions = torch.cat([s.actions for s in ds.seqs])
        assert torch.bincount(actions).tolist() == [0, 75_693, 4_494, 2_351, 1_749]
        assert ds.engagement_actions == BEHAVIOR_ENGAGEMENT == {BEHAVIORS[b] for b in ("cart", "fav", "buy")}
        assert (stats["median_len"], stats["p90_len"], stats["max_len"]) == (78, 226, 539)


def test_leave_one_out():
    ds = load_dataset("synth-short:users=20,mean_len=30,min_len=1")
    ds.seqs[0] = ds.seqs[0][:2]  # a user too short to evaluate
    split = leave_one_out(ds)
    assert len(split.train) == len(ds.seqs)
    assert len(split.train[0]) == 2 and all(c.user_index != 0 for c in split.test)
    for v, t in zip(split.valid, split.test, strict=True):
        s = ds.seqs[t.user_index]
        assert v.user_index == t.user_index
        assert torch.equal(split.train[v.user_index].items, s.items[:-2])
        assert torch.equal(v.history.items, s.items[:-2]) and v.target == int(s.items[-2])
        assert torch.equal(t.history.items, s.items[:-1]) and t.target == int(s.items[-1])
        assert t.target_ts == int(s.ts[-1])


def test_stream_split_by_fraction_and_by_time():
    ds = build_dataset("s", torch.tensor([1] * 4 + [2] * 2 + [3]).numpy(), torch.arange(7).numpy(),
                       torch.tensor([1, 2, 3, 4, 5, 6, 1]).numpy())
    by_frac = stream_split(ds, fraction=0.5)
    assert [(u.user_id, len(u.prefix), len(u.future)) for u in by_frac] == [("1", 2, 2), ("2", 1, 1)]
    by_time = stream_split(ds, cut_time=4)
    assert [(u.user_id, u.prefix.ts.tolist(), u.future.ts.tolist()) for u in by_time] == [
        ("1", [1, 2, 3], [4])
    ]
    assert [u.user_id for u in stream_split(ds, fraction=0.5, min_prefix=2)] == ["1"]
    with pytest.raises(ValueError):
        stream_split(ds, fraction=None)


def test_cli_synth_writes_loadable_csv_and_stats_prints_table(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--users", "15", "--mean-len", "40"]) == 0
    assert (tmp_path / "events.csv").read_text().startswith("user_id,item_id,timestamp,action\n")
    assert '"users": 15' in (tmp_path / "synth.json").read_text()
    assert main(["data", "stats", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "users        15" in out and "fingerprint" in out
    assert main(["data", "stats", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
