#!/usr/bin/env python
"""Build dataset/em_mito_sample: the real SBEM sample (mouse neuropil, 1024 x 1024 px, mitochondria labels).

Downloads the files of CDeep3M's mito_testsample (CRBS/cdeep3m on GitHub, at the commit pinned
below) into our layout: train (12 slices), valid (4), test (4) and unlabeled (5). Every file's
SHA-256 is checked against em_mito_sample.sha256 beside this script; each file is written to a
temporary name and renamed, so a file in place is always whole and verified. An interrupted run
resumes where it stopped: finished files are kept, and a half-downloaded file goes on from its
last byte. With --from DIR, a local copy in our layout is copied and verified instead.

The images and labels are the CDeep3M authors' (The Regents of the University of California):
education, research and non-profit use, with their notice kept with every copy. The script
puts their LICENSE beside the data as LICENSE.cdeep3m.

Examples:
  python dataset/download_em_mito_sample.py                      # -> dataset/em_mito_sample
  python dataset/download_em_mito_sample.py --from /data/em_mito_sample --output dataset/em_mito_sample
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "em_mito_sample.sha256"
COMMIT = "abf995802608073532f324ce57425fa1b7cf9d19"
BASE_URL = f"https://raw.githubusercontent.com/CRBS/cdeep3m/{COMMIT}"
SAMPLE = "mito_testsample"
LICENSE = ("LICENSE", "LICENSE.cdeep3m")  # upstream path, name beside the data
CHUNK = 1 << 16


class DownloadError(Exception):
    """A file that could not be fetched or failed its check; the message names it."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="download_em_mito_sample.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(HERE / "em_mito_sample"),
                        help="where the dataset goes (default: dataset/em_mito_sample)")
    parser.add_argument("--from", dest="source", metavar="DIR",
                        help="copy and verify a local copy in our layout instead of downloading")
    parser.add_argument("--base-url", default=BASE_URL,
                        help="where the repository's files are served (default: GitHub, pinned commit)")
    return parser.parse_args(argv)


def read_manifest(path: Path = MANIFEST) -> list[tuple[str, str, str]]:
    """(sha256, path in our layout, path under mito_testsample upstream) for every file."""
    rows = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, local, upstream = line.split()
            rows.append((digest, local, upstream))
    return rows


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def partial_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial")


def download(url: str, target: Path, timeout: float = 60) -> None:
    """Fetch ``url`` into ``target``'s partial file, resuming from its size where the server allows."""
    partial = partial_path(target)
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            resumed = have and response.status == 206
            with open(partial, "ab" if resumed else "wb") as file:
                shutil.copyfileobj(response, file, CHUNK)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # asked past the end: the partial file is already whole
            return
        raise DownloadError(f"{url}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise DownloadError(f"{url}: {reason} (rerun the same command to resume)") from None


def place(partial: Path, target: Path, expected: str | None, name: str) -> None:
    """Check the partial file's SHA-256 and rename it into place; a file that fails is removed."""
    if expected is not None:
        found = sha256(partial)
        if found != expected:
            partial.unlink()
            raise DownloadError(f"{name}: SHA-256 {found} is not the expected {expected} (corrupt or changed "
                                "upstream; removed, rerun to fetch it again)")
    os.replace(partial, target)


def fetch(rows, output: Path, source: Path | None, base_url: str) -> tuple[int, int]:
    """Put every file of ``rows`` in place; returns (files fetched, files already there and verified)."""
    from tqdm import tqdm

    fetched = kept = 0
    for expected, local, upstream in tqdm(rows, desc="em_mito_sample", unit="file", file=sys.stderr):
        target = output / local
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and (expected is None or sha256(target) == expected):
            kept += 1
            continue
        partial = partial_path(target)
        if source is not None:
            origin = source / local
            if not origin.is_file():
                raise DownloadError(f"{origin}: not found in --from {source}")
            shutil.copyfile(origin, partial)
        else:
            download(f"{base_url}/{upstream}", target)
        place(partial, target, expected, str(source / local if source else f"{base_url}/{upstream}"))
        fetched += 1
    return fetched, kept


def main(argv=None) -> int:
    args = parse_args(argv)
    output = Path(args.output)
    source = Path(args.source) if args.source else None
    rows = [(digest, local, f"{SAMPLE}/{upstream}") for digest, local, upstream in read_manifest()]
    # The licence travels with the data; its bytes are not pinned (only the data's are).
    rows.append((None, LICENSE[1], LICENSE[0] if source is None else LICENSE[1]))
    try:
        if source is not None and not source.is_dir():
            raise DownloadError(f"{source}: --from folder not found")
        output.mkdir(parents=True, exist_ok=True)
        fetched, kept = fetch(rows, output, source, args.base_url.rstrip("/"))
    except DownloadError as error:
        print(f"download_em_mito_sample.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("download_em_mito_sample.py: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    print(f"{output}: {fetched} files fetched, {kept} already there; all {len(rows) - 1} data files verified "
          "(SHA-256)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
