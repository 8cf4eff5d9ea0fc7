"""MovieLens fetching against a local zip (file://): no test touches the network."""

from __future__ import annotations

import hashlib
import zipfile

import pytest
from kvrec.models.fetch import ChecksumError, fetch_movielens


@pytest.fixture
def zipped(tmp_path):
    """A GroupLens-shaped zip: one top folder holding ratings.csv; returns (file URL, md5)."""
    path = tmp_path / "src" / "ml-latest-small.zip"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ml-latest-small/ratings.csv", "userId,movieId,rating,timestamp\n1,2,4.0,5\n")
    return path.as_uri(), hashlib.md5(path.read_bytes()).hexdigest()


def test_fetch_verifies_and_extracts(tmp_path, zipped):
    url, md5 = zipped
    dest = tmp_path / "data"
    out = fetch_movielens("ml-latest-small", dest, url=url, md5=md5)
    assert out == dest / "ml-latest-small"
    assert (out / "ratings.csv").read_text().startswith("userId")
    assert sorted(p.name for p in dest.iterdir()) == ["ml-latest-small"]  # no partial folder left
    assert fetch_movielens("ml-latest-small", dest, url="file:///nonexistent.zip") == out  # already there


def test_checksum_mismatch_leaves_nothing(tmp_path, zipped):
    url, _ = zipped
    dest = tmp_path / "data"
    with pytest.raises(ChecksumError, match="md5 is"):
        fetch_movielens("ml-latest-small", dest, url=url, md5="0" * 32)
    with pytest.raises(ChecksumError, match="c4d9eecfca2ab87c1945afe126590906"):  # the published ml-1m md5
        fetch_movielens("ml-1m", dest, url=url)
    assert list(dest.iterdir()) == []


def test_unverifiable_download_warns_and_unknown_name_fails(tmp_path, zipped):
    url, _ = zipped
    with pytest.warns(UserWarning, match="cannot be verified"):
        fetch_movielens("ml-latest-small", tmp_path / "data", url=url)
    with pytest.raises(ValueError, match="known: ml-latest-small"):
        fetch_movielens("ml-2m", tmp_path / "data")
