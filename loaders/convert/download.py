"""The official archives of the reference datasets: where they live, their published MD5, a resumable fetch.

A download goes to `<file>.part`; a later run asks the server for the rest (HTTP Range) and appends when the server
answers 206, or starts over when it does not. The finished file is renamed into place only after its MD5 matches.
Offline (or behind a firewall) the error says which file to fetch from where and where to put it.
"""
from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from loaders.sidecar import DatasetFileError


@dataclass(frozen=True)
class Resource:
    filename: str
    url: str
    md5: str
    split: Optional[str] = None     # the split a per-split file holds (SVHN); None: the archive holds all


RESOURCES: dict[str, list[Resource]] = {
    "cifar10": [Resource("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                         "c58f30108f718f92721af3b95e74349a")],
    "cifar100": [Resource("cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                          "eb9058c3a382ffc7106e4002c42a8d85")],
    "svhn": [Resource("train_32x32.mat", "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
                      "e26dedcc434d2e4c54c9b2d4a06d8373", "train"),
             Resource("test_32x32.mat", "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
                      "eb5a983be6a315427106f1b164d9cef3", "test"),
             Resource("extra_32x32.mat", "http://ufldl.stanford.edu/housenumbers/extra_32x32.mat",
                      "a93ce644f1a588dc4d68dda5feec44a7", "extra")],
    "tinyimagenet": [Resource("tiny-imagenet-200.zip", "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
                              "90528d7ca1a48142e341f4ef8d21d0de")],
}
ALIASES = {"cifar-10": "cifar10", "cifar-100": "cifar100", "tiny-imagenet": "tinyimagenet",
           "tiny-imagenet-200": "tinyimagenet", "tiny_imagenet": "tinyimagenet"}
DEFAULT_SPLITS = {"svhn": ["train", "test"]}


def known_name(word: str) -> Optional[str]:
    word = word.lower()
    word = ALIASES.get(word, word)
    return word if word in RESOURCES else None


def resources_for(name: str, splits: Optional[list[str]]) -> list[Resource]:
    res = RESOURCES[name]
    if all(r.split is None for r in res):
        return res
    wanted = splits or DEFAULT_SPLITS.get(name, [r.split for r in res])
    by_split = {r.split: r for r in res}
    missing = [s for s in wanted if s not in by_split]
    if missing:
        raise DatasetFileError(f"{name}: no split {missing} (has {list(by_split)})")
    return [by_split[s] for s in wanted]


def file_md5(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def place_hint(res: Resource, dest: Path) -> str:
    return f"fetch {res.url} (md5 {res.md5}) and place it at {dest}"


def resource_url(res: Resource, mirror: Optional[str]) -> str:
    return f"{mirror.rstrip('/')}/{res.filename}" if mirror else res.url


def fetch(res: Resource, folder: Path, mirror: Optional[str] = None, progress: bool = True,
          timeout: float = 30.0) -> Path:
    """Make `folder/res.filename` exist with the published MD5: reuse it, resume its .part, or download it."""
    folder = Path(folder)
    dest = folder / res.filename
    if dest.is_file():
        got = file_md5(dest)
        if got != res.md5:
            raise DatasetFileError(f"{dest}: md5 {got} differs from the published {res.md5}; delete it and run "
                                   f"again with --download, or {place_hint(res, dest)}")
        return dest
    folder.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    url = resource_url(res, mirror)
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code != 416 or not have:
                raise
            response = None  # 416: nothing after `have` bytes; the .part may be complete, the MD5 decides
        if response is not None:
            with response:
                status = getattr(response, "status", None)
                resumed = bool(have) and status == 206 and _range_start(response) == have
                total = response.headers.get("Content-Length")
                total = int(total) + (have if resumed else 0) if total else None
                _stream(response, part, append=resumed, start=have if resumed else 0, total=total,
                        desc=res.filename, progress=progress)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        kept = f"; the partial download {part} is kept and resumed next time" if part.exists() else ""
        raise DatasetFileError(f"{dest}: could not download {url} ({reason}){kept}. Offline? "
                               f"{place_hint(res, dest)}") from None
    got = file_md5(part)
    if got != res.md5:
        part.unlink()
        raise DatasetFileError(f"{dest}: downloaded file has md5 {got}, expected {res.md5}; removed it, run again "
                               f"or {place_hint(res, dest)}")
    os.replace(part, dest)
    return dest


def _range_start(response) -> Optional[int]:
    value = response.headers.get("Content-Range", "")  # 'bytes 100-999/1000'
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _stream(response, part: Path, append: bool, start: int, total: Optional[int], desc: str,
            progress: bool) -> None:
    from tqdm import tqdm

    with open(part, "ab" if append else "wb") as out, \
            tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=desc, disable=not progress,
                 file=sys.stderr) as bar:
        while block := response.read(1 << 20):
            out.write(block)
            bar.update(len(block))
        out.flush()
        os.fsync(out.fileno())


def locate_or_fetch(name: str, folder: Path, splits: Optional[list[str]], download: bool,
                    mirror: Optional[str] = None, progress: bool = True) -> list[Path]:
    """The local paths of `name`'s official files in `folder`; downloaded when `download`, else an error that
    says what to fetch and where to place it."""
    paths = []
    for res in resources_for(name, splits):
        dest = Path(folder) / res.filename
        if download:
            paths.append(fetch(res, folder, mirror, progress))
        elif dest.is_file():
            paths.append(dest)
        else:
            raise DatasetFileError(f"{dest}: not found; pass --download, or {place_hint(res, dest)}")
    return paths
