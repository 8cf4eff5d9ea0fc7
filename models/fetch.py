"""Download, verify and unpack MovieLens releases from GroupLens.

The checksums are the `.md5` files that GroupLens publishes beside each zip. `ml-latest-small` has
none that is stable (the file changes with each release), so it is verified only when the caller
passes a checksum, and otherwise a warning says so. The archive is extracted into a temporary folder
beside the destination and renamed into place only after it has been verified and fully extracted, so
a failure never leaves a half-written dataset behind. `url` accepts `file://`, which is how the tests
run without a network.
"""

from __future__ import annotations

import hashlib
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path

from kvrec.models.data import DataError

BASE_URL = "https://files.grouplens.org/datasets/movielens"
KNOWN_MD5 = {
    "ml-latest-small": None,
    "ml-1m": "c4d9eecfca2ab87c1945afe126590906",
    "ml-10m": "ce571fd55effeba0271552578f2648bd",
    "ml-20m": "cd245b17a1ae2cc31bb14903e1204af3",
    "ml-25m": "6b51fb2759a8657d3bfcbfc42b592ada",
}
_CHUNK = 1 << 20


class ChecksumError(DataError):
    """The downloaded archive is not the one expected."""


def fetch_movielens(
    name: str,
    dest_dir: str | Path,
    *,
    url: str | None = None,
    md5: str | None = None,
    sha256: str | None = None,
) -> Path:
    """Download `name` (e.g. `ml-25m`) into `dest_dir/name` and return that folder.

    `md5` / `sha256` override the known checksum; an existing folder is returned without downloading.
    """
    if name not in KNOWN_MD5:
        raise DataError(f"unknown MovieLens dataset {name!r}; known: {', '.join(KNOWN_MD5)}")
    dest_dir = Path(dest_dir)
    target = dest_dir / name
    if target.is_dir():
        return target
    md5 = md5 or (None if sha256 else KNOWN_MD5[name])
    if md5 is None and sha256 is None:
        warnings.warn(f"{name} has no published checksum; the download cannot be verified", stacklevel=2)
    url = url or f"{BASE_URL}/{name}.zip"
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=f".{name}.partial-") as tmp:
        archive = Path(tmp) / f"{name}.zip"
        digests = _download(url, archive)
        for algo, want in (("md5", md5), ("sha256", sha256)):
            if want and digests[algo] != want.lower():
                got = digests[algo]
                raise ChecksumError(f"{url}: {algo} is {got}, expected {want}; nothing was extracted")
        root = _extract(archive, Path(tmp) / "x")
        root.rename(target)
    return target


def _download(url: str, path: Path) -> dict[str, str]:
    """Stream `url` to `path` with a progress bar; return the md5 and sha256 hex digests."""
    from tqdm import tqdm

    hashes = {"md5": hashlib.md5(), "sha256": hashlib.sha256()}
    try:
        resp = urllib.request.urlopen(url)
    except (urllib.error.URLError, ValueError) as exc:  # ValueError: not a URL at all
        raise DataError(f"cannot download {url}: {exc}; check the address and the network, or download "
                        "the zip yourself and pass --url file:///path/to/it.zip") from None
    with resp, open(path, "wb") as out:
        size = resp.headers.get("Content-Length")
        with tqdm(total=int(size) if size else None, unit="B", unit_scale=True, desc=path.name) as bar:
            while chunk := resp.read(_CHUNK):
                out.write(chunk)
                for h in hashes.values():
                    h.update(chunk)
                bar.update(len(chunk))
    return {algo: h.hexdigest() for algo, h in hashes.items()}


def _extract(archive: Path, into: Path) -> Path:
    """Extract `archive` into `into` (refusing members that escape it); return the dataset folder,
    the archive's single top-level folder when it has one (GroupLens zips do)."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise DataError(f"{archive.name}: the download is not a zip archive; check --url") from None
    with zf:
        for member in zf.namelist():
            if not (into / member).resolve().is_relative_to(into.resolve()):
                raise DataError(f"{archive.name}: member {member!r} would be written outside the folder")
        zf.extractall(into)
    entries = list(into.iterdir())
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else into

