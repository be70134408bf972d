"""The README's Python example (examples/quickstart.py) runs as written: define, record, filter, train, export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _netguard import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "quickstart.py"


def test_readme_shows_the_example_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    assert EXAMPLE.read_text() in readme, "README's Python example drifted from examples/quickstart.py"


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        cwd=tmp_path,
        env=subprocess_env(),  # the test network guard holds in the example's process too
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from graphdistill.recording.photos import DEFAULT_HELDOUT, builtin_photos
    from graphdistill.store.trace_store import TraceStore

    store = TraceStore(tmp_path / "my-traces")
    traces = list(store.iter())
    assert len(traces) == len(builtin_photos()) and all(t.status == "ok" for t in traces)
    assert {s.node for t in traces for s in t.spans} == {"look"}
    manifest = json.loads((tmp_path / "my-dataset" / "manifest.json").read_text())
    assert manifest["splits"]["test"] == len(DEFAULT_HELDOUT)  # the held-out photos, and nothing else
    # the node's model (the YOLO detector) offers its trunk and head: the student started from them, and the
    # bundle carries their licence
    assert manifest["graph"]["offers"]["look"]["kind"] == "ultralytics-detect"
    bundle = json.loads((tmp_path / "my-bundle" / "manifest.json").read_text())
    assert bundle["parity"]["passed"] is True
    assert bundle["student_config"]["trunk"] == "ultralytics"
    assert bundle["started_from"]["node"] == "look" and "AGPL-3.0" in bundle["licence"]
    photo = tmp_path / "cat.png"
    from PIL import Image

    from graphdistill.recording.photos import photo as builtin

    Image.fromarray(builtin("skimage/chelsea").image()).save(photo)
    out = subprocess.run(
        [sys.executable, "-m", "graphdistill.cli", "run-bundle", str(tmp_path / "my-bundle"), "--image", str(photo),
         "--question", "What is in this picture?", "--json"],
        env=subprocess_env(), capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    answer = json.loads(out.stdout)
    assert set(answer) == {"answer", "objects"}
    assert "cat" in [o["label"] for o in answer["objects"]]  # the detector it started from finds the cat
