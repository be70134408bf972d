"""A folder given as a local path or an fsspec URL, resolved once into (filesystem, root).

Datasets and trace exports live wherever fsspec reaches: a plain path or ``file://`` on this machine,
``memory://`` (tests), ``s3://``, ``gs://``, ``az://``, ... with the user's own credentials, which fsspec and
the protocol's package read from their usual config and environment (graphdistill never reads or stores
them). :func:`resolve` is the one place a path-or-URL becomes a :class:`Location`; every file a dataset or an
export reads or writes goes through it.

Writes are atomic on a local disk (a temp file renamed into place). An object store has no atomic rename, so a
file is written whole, in one put; what makes a folder complete (a dataset's manifest.json) is written last.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from graphdistill._lazy import MissingDependencyError
from graphdistill.errors import GraphdistillError


def is_url(path: str | os.PathLike[str]) -> bool:
    """True for ``protocol://...``; a plain path (relative, absolute, ``~``) is not a URL."""
    return "://" in os.fspath(path)


def ref(path: str | os.PathLike[str]) -> str:
    """What a run or a report records to find the folder again: a local path made absolute, a URL as given."""
    return os.fspath(path) if is_url(path) else str(Path(path).resolve())


@dataclass(frozen=True)
class Location:
    """A folder on some filesystem: ``fs`` (an fsspec filesystem), ``root`` (the folder in ``fs``'s own path
    form) and ``url`` (what the user gave, which every message names). Paths below it are ``/``-joined parts."""

    fs: Any
    root: str
    url: str
    local: bool

    def path(self, *parts: str) -> str:
        """The file ``parts`` below the root, in ``fs``'s path form (an OS path when local)."""
        if self.local:
            return os.path.join(self.root, *parts)
        return "/".join([self.root.rstrip("/"), *parts])

    def name(self, *parts: str) -> str:
        """The file as messages name it: below the path or URL the user gave."""
        if not parts:
            return self.url
        if not is_url(self.url):
            return str(Path(self.url, *parts))
        return "/".join([self.url.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        return bool(self.fs.exists(self.path(*parts)))

    def isdir(self, *parts: str) -> bool:
        return bool(self.fs.isdir(self.path(*parts)))

    def makedirs(self, *parts: str) -> None:
        """The folder, on filesystems that have folders (an object store's are implied by its keys)."""
        self.fs.makedirs(self.path(*parts), exist_ok=True)

    def open(self, *parts: str, mode: str = "rb") -> IO[bytes]:
        f: IO[bytes] = self.fs.open(self.path(*parts), mode)
        return f

    def read_bytes(self, *parts: str) -> bytes:
        data: bytes = self.fs.cat_file(self.path(*parts))
        return data

    def write_bytes(self, *parts: str, data: bytes) -> None:
        """Write one whole file: a temp file renamed into place when local, one put on an object store (whose
        readers see the old object or the new one, never a part)."""
        if not self.local:
            self.fs.pipe_file(self.path(*parts), data)
            return
        path = Path(self.path(*parts))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)

    def glob(self, pattern: str) -> list[str]:
        """The files ``pattern`` matches directly below the root, as their names (sorted)."""
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.glob(self.path(pattern)))

    def remove(self, *parts: str) -> None:
        self.fs.rm_file(self.path(*parts))

    def upload(self, local_dir: Path, *parts: str) -> None:
        """Copy the local folder ``local_dir`` (every file below it) to ``parts`` below the root."""
        for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = file.relative_to(local_dir).parts
            self.write_bytes(*parts, *rel, data=file.read_bytes())


def resolve(
    path: str | os.PathLike[str], what: str, error: type[GraphdistillError] = GraphdistillError
) -> Location:
    """The folder ``path`` (a local path or an fsspec URL) as a :class:`Location`; ``what`` names it in errors
    ("dataset", "export folder"). An unknown protocol raises ``error``; a protocol whose package is not
    installed raises :class:`MissingDependencyError` naming the package to install."""
    url = os.fspath(path)
    if not is_url(url):
        from fsspec.implementations.local import LocalFileSystem

        return Location(LocalFileSystem(), str(Path(url).expanduser().absolute()), url, True)
    import fsspec
    from fsspec.registry import known_implementations

    protocol = url.split("://", 1)[0]
    try:
        fs, root = fsspec.url_to_fs(url)
    except ImportError as exc:
        known = known_implementations.get(protocol, {})
        package = str(known.get("class", protocol)).split(".")[0]
        raise MissingDependencyError(
            f"{what} {url}: the {protocol}:// filesystem needs the package '{package}', which is not "
            f"installed ({exc}). Install it with: pip install {package}"
        ) from exc
    except ValueError as exc:
        if protocol not in fsspec.available_protocols():
            raise error(
                f"{what} {url}: unknown filesystem protocol {protocol!r} (give a local path or an fsspec "
                "URL: file://, memory://, s3://, gs://, az://, ...)"
            ) from exc
        raise error(f"{what} {url}: not a usable URL ({exc})") from exc
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    return Location(fs, str(root), url, local)
