"""File trees the format readers walk: a folder, a tar archive (any compression) or a zip, behind one interface.

    tree.files()        -> sorted list of member paths ('train/cat/0001.jpg'), '/'-separated, relative to the root
    tree.read(member)   -> bytes
    tree.locate(member) -> 'cifar10-jpg.tar.gz:train/cat/0001.jpg' (for error messages)
    tree.checksum(members) -> sha256 hex of what was read
    tree.warnings       -> notes for the user (symlinks not followed, files left out), printed by `convert`

Tar archives cannot be read at random (gzip), so a TarTree reads the wanted members into memory in one
sequential pass and hashes the archive bytes on the way; the FFCV writer's forked workers then share those bytes.
A ZipTree reads members lazily, one ZipFile handle per process.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import zipfile
from pathlib import Path
from typing import Callable, Optional

from loaders.sidecar import DatasetFileError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz", ".zip")


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


class DirTree:
    """A folder. Symlinked folders are followed, but every real folder is listed once: a link to a folder the tree
    already holds (a loop such as `class/loop -> ..`, or an alias of a sibling) is not followed and reported in
    `warnings`, so each file is counted once."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.origin = str(self.root)
        self._files: Optional[list[str]] = None
        self._dirs: set[str] = set()
        self.warnings: list[str] = []

    def files(self) -> list[str]:
        if self._files is None:
            self._files, self._dirs, self.warnings = walk_folder(self.root)
        return self._files

    def dirs(self, under: str) -> list[str]:
        """Immediate subfolder names of `under` (empty folders included, which a member listing cannot show)."""
        self.files()
        return _child_dirs(self._dirs, under)

    def read(self, member: str) -> bytes:
        return (self.root / member).read_bytes()

    def locate(self, member: str) -> str:
        return str(self.root / member)

    def checksum(self, members: list[str]) -> str:
        h = hashlib.sha256()
        for m in members:
            h.update(m.encode() + b"\0")
            h.update(hashlib.sha256(self.read(m)).digest())
        return h.hexdigest()


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def walk_folder(root: Path) -> tuple[list[str], set[str], list[str]]:
    """-> (sorted file paths, folder paths, warnings), '/'-separated and relative to `root`.

    Two passes: the real folders first (symlinks not followed), then a walk that also follows symlinked folders,
    each only when its target is not a real folder of the tree and was not reached before. Files (symlinked or
    not, broken links included: reading them names them) are listed by the path they were reached at.
    """
    try:
        real = {_identity(dirpath) for dirpath, _, _ in os.walk(root)}
    except OSError as exc:
        raise DatasetFileError(f"{root}: cannot list the folder ({exc})") from None
    files, dirs, warnings = [], set(), []
    reached = set(real)
    stack = [("", True)]     # (folder, reached through real folders only)
    while stack:
        rel, in_real = stack.pop()
        here = root / rel if rel else root
        try:
            entries = sorted(os.scandir(here), key=lambda e: e.name)
        except OSError as exc:
            raise DatasetFileError(f"{here}: cannot list the folder ({exc})") from None
        subdirs = []
        for entry in entries:
            member = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if not is_dir:
                files.append(member)
                continue
            real_child = in_real and not entry.is_symlink()
            if not real_child:
                ident = _identity(entry.path)
                if ident in reached:
                    target = os.path.realpath(entry.path)
                    above = (os.path.realpath(here) + os.sep).startswith(target + os.sep)
                    why = "symlink loop (it points to a folder above it)" if above else "a folder already listed"
                    warnings.append(f"{entry.path} -> {target}: {why}; not followed, each file is counted once")
                    continue
                reached.add(ident)
            dirs.add(member)
            subdirs.append((member, real_child))
        stack.extend(reversed(subdirs))
    return sorted(files), dirs, warnings


def _child_dirs(dirs: set[str], under: str) -> list[str]:
    prefix = under.rstrip("/") + "/" if under else ""
    return sorted({d[len(prefix):].split("/")[0] for d in dirs if d.startswith(prefix) and d != under})


class _HashingReader:
    """A read-only file wrapper that hashes every byte read (tarfile streams through it)."""

    def __init__(self, fh):
        self.fh, self.sha = fh, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.sha.update(data)
        return data


class _ArchiveIndex:
    """files() and dirs() over an archive's member names: `_index(files, dirs)` fills them, adding every parent
    folder of every file (archives need not list their folders)."""

    def _index(self, files, dirs) -> None:
        self.warnings: list[str] = []
        self._files = sorted(files)
        self._dirs = set(dirs)
        for name in self._files:
            parts = name.split("/")
            for k in range(1, len(parts)):
                self._dirs.add("/".join(parts[:k]))

    def files(self) -> list[str]:
        return self._files

    def dirs(self, under: str) -> list[str]:
        return _child_dirs(self._dirs, under)


class TarTree(_ArchiveIndex):
    def __init__(self, path: Path, keep: Callable[[str], bool] = lambda m: True):
        """Read every regular member whose path passes `keep` into memory, in one sequential pass."""
        self.path = Path(path)
        self.origin = str(self.path)
        self._data: dict[str, bytes] = {}
        self._dirs: set[str] = set()
        with open(self.path, "rb") as raw:
            reader = _HashingReader(raw)
            try:
                with tarfile.open(fileobj=reader, mode="r|*") as tar:
                    for info in tar:
                        name = info.name[2:] if info.name.startswith("./") else info.name
                        name = name.rstrip("/")
                        if info.isdir():
                            self._dirs.add(name)
                        elif info.isfile() and keep(name):
                            fh = tar.extractfile(info)
                            self._data[name] = fh.read()
                            if len(self._data[name]) != info.size:
                                raise EOFError(f"member {name} is cut short")
                while reader.read(1 << 20):  # hash to the end (tar padding)
                    pass
            except (tarfile.TarError, EOFError, OSError, zipfile.BadZipFile) as exc:
                raise DatasetFileError(f"{self.path}: truncated or corrupt archive ({type(exc).__name__}: {exc})") \
                    from None
        self._sha = reader.sha.hexdigest()
        self._index(self._data, self._dirs)

    def read(self, member: str) -> bytes:
        return self._data[member]

    def locate(self, member: str) -> str:
        return f"{self.path}:{member}"

    def checksum(self, members: list[str]) -> str:
        return self._sha


class ZipTree(_ArchiveIndex):
    def __init__(self, path: Path):
        self.path = Path(path)
        self.origin = str(self.path)
        self._handle: Optional[zipfile.ZipFile] = None
        self._pid = -1
        try:
            with zipfile.ZipFile(self.path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise DatasetFileError(f"{self.path}: truncated or corrupt zip archive ({exc})") from None
        self._index((i.filename for i in infos if not i.is_dir()), (i.filename.rstrip("/") for i in infos if i.is_dir()))
        self._sha: Optional[str] = None

    def read(self, member: str) -> bytes:
        if self._handle is None or self._pid != os.getpid():  # one handle per (forked) process
            self._handle, self._pid = zipfile.ZipFile(self.path), os.getpid()
        try:
            return self._handle.read(member)
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise DatasetFileError(f"{self.locate(member)}: cannot read from archive ({exc})") from None

    def locate(self, member: str) -> str:
        return f"{self.path}:{member}"

    def checksum(self, members: list[str]) -> str:
        if self._sha is None:
            self._sha = file_sha256(self.path)
        return self._sha


def open_tree(path: Path, keep: Callable[[str], bool] = lambda m: True):
    """A DirTree, TarTree or ZipTree for `path` (keep filters which tar members are loaded into memory)."""
    path = Path(path)
    if path.is_dir():
        return DirTree(path)
    if not path.exists():
        raise DatasetFileError(f"{path}: no such file or folder")
    if path.name.lower().endswith(".zip"):
        return ZipTree(path)
    if is_archive(path):
        return TarTree(path, keep)
    raise DatasetFileError(f"{path}: not a folder or a .tar/.tar.gz/.tgz/.zip archive")


def common_root(tree, marker: Callable[[list[str]], bool]) -> str:
    """The folder inside `tree` that holds the dataset: '' or the single top folder an archive wraps it in.

    `marker(names)` says whether a folder's immediate child names look like the dataset root.
    """
    top = tree.dirs("")
    if marker(top + [f for f in tree.files() if "/" not in f]):
        return ""
    if len(top) == 1:
        inner = top[0]
        names = tree.dirs(inner) + [f.split("/", 1)[1] for f in tree.files()
                                    if f.startswith(inner + "/") and f.count("/") == 1]
        if marker(names):
            return inner
    return ""
