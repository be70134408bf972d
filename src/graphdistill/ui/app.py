"""The web app of ``graphdistill ui``: four pages over one read-only :class:`~.sources.Sources`.

Pages are static HTML + one script each (``static/``); they read the JSON API below. Everything is served
from this process: onnxruntime-web's files are vendored into ``static/vendor/ort`` at setup time
(``make ui-assets``), never fetched from a CDN. Every route reads; none writes to the store (it is open
with SQLite ``mode=ro``). The headers make the page cross-origin isolated, so onnxruntime-web may use
WASM threads.
"""

from __future__ import annotations

import base64
import binascii
import logging
import string
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from graphdistill._lazy import require
from graphdistill.store.trace_store import StoreError
from graphdistill.ui import views
from graphdistill.ui.sources import Sources, UIError

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
ORT_DIR = STATIC / "vendor" / "ort"
# the onnxruntime-web files the Try-it page loads (Makefile: ui-assets copies them from the npm package)
ORT_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
# page -> the scripts it loads before common.js and its own <page>.js (static/page.html is every page's HTML)
PAGES: dict[str, tuple[str, ...]] = {
    "traces": (),
    "trace": (),
    "filter": (),
    "fidelity": (),
    "try": ("vendor/ort/ort.wasm.min.js", "runner.js"),
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_DRAW_BYTES = 40 << 20


class DrawRequest(BaseModel):
    image: str  # the photo's file, base64
    output: dict[str, Any] = {}  # answer, objects (boxes in the photo's pixels, RLE masks), sources


def runtime_assets_missing() -> list[str]:
    return [f for f in ORT_FILES if not (ORT_DIR / f).is_file()]


def create_app(src: Sources) -> Any:
    """The FastAPI application serving ``src``."""
    fastapi = require("fastapi", "ui", purpose="graphdistill ui")
    responses = require("fastapi.responses", "ui")
    staticfiles = require("fastapi.staticfiles", "ui")
    Response = responses.Response

    app = fastapi.FastAPI(title="graphdistill", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", staticfiles.StaticFiles(directory=STATIC), name="static")
    fidelity: list[views.Fidelity] = []  # made on first use: it opens the dataset's split

    def get_fidelity() -> views.Fidelity:
        if not fidelity:
            fidelity.append(views.Fidelity(src))
        return fidelity[0]

    async def isolate(request: Any, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
        response.headers["Cross-Origin-Embedder-Policy"] = "require-corp"
        response.headers["Cross-Origin-Resource-Policy"] = "same-origin"
        return response

    async def not_found(request: Any, exc: UIError) -> Any:
        return responses.JSONResponse({"error": str(exc)}, status_code=404)

    def png(data: bytes) -> Any:
        return Response(content=data, media_type="image/png")

    # -- pages ---------------------------------------------------------------------------------------------
    def favicon() -> Any:
        return Response(status_code=204)

    def index() -> Any:
        return responses.RedirectResponse("/traces")

    for name, scripts in PAGES.items():
        app.add_api_route(f"/{name}", _page(responses, name, scripts), methods=["GET"])

    # -- API -----------------------------------------------------------------------------------------------
    def info() -> Any:
        return {
            **src.describe(),
            "pages": {
                "filter": src.dataset is not None,
                "fidelity": src.eval is not None and src.dataset is not None,
                "try": src.bundle is not None,
            },
            "runtime_missing": runtime_assets_missing(),
        }

    def traces(offset: int = 0, limit: int = 50, q: str = "", status: str | None = None) -> Any:
        return views.trace_list(src, offset=offset, limit=limit, search=q, status=status or None)

    def trace(trace_id: str) -> Any:
        return views.trace_view(src, trace_id)

    def trace_picture(trace_id: str, node: str | None = None) -> Any:
        return png(views.trace_picture(src, trace_id, node or None))

    def blob(sha: str) -> Any:
        try:
            data = src.store.blob(sha)
        except (ValueError, StoreError) as exc:  # not a digest; missing or corrupt
            raise UIError(f"blob {sha[:80]!r}: {exc}") from exc
        if not data.startswith(PNG_SIGNATURE):
            raise UIError(f"blob {sha}: not an image")
        return png(data)

    def filter_page(
        offset: int = 0, limit: int = 50, rule: str | None = None, kept: str | None = None
    ) -> Any:
        want = None if kept in (None, "") else kept == "true"
        return views.filter_view(src, offset=offset, limit=limit, rule=rule or None, kept=want)

    def fidelity_table(sort: str = "disagreement", order: str = "desc") -> Any:
        return get_fidelity().table(sort=sort, descending=order != "asc")

    def fidelity_pair(row_id: str) -> Any:
        return get_fidelity().pair(row_id)

    def fidelity_picture(row_id: str) -> Any:
        return png(get_fidelity().picture(row_id))

    def fidelity_image(row_id: str) -> Any:
        return png(get_fidelity().image(row_id))

    def bundle_file(name: str) -> Any:
        if src.bundle is None or src.manifest is None:
            raise UIError("no bundle given: start graphdistill ui with --bundle BUNDLE (an ONNX bundle)")
        if name != "manifest.json" and name not in src.manifest["files"]:
            raise UIError(f"bundle {src.bundle}: no file {name!r}")
        return responses.FileResponse(src.bundle / name)

    def draw(body: DrawRequest) -> Any:
        """An output drawn on its image (the Try-it page's in-browser result)."""
        try:
            raw = base64.b64decode(body.image.split(",")[-1], validate=True)
        except binascii.Error as exc:
            raise UIError(f"draw: the body needs image (a base64 PNG): {exc}") from exc
        if len(raw) > MAX_DRAW_BYTES:
            raise UIError(f"draw: the image is {len(raw)} bytes, more than {MAX_DRAW_BYTES}")
        from graphdistill.images import ImageError, load_image

        try:
            image = load_image(raw, name="the uploaded photo")
        except ImageError as exc:
            raise UIError(str(exc)) from exc
        return png(views.draw(np.asarray(image), body.output))

    app.middleware("http")(isolate)
    app.add_exception_handler(UIError, not_found)
    app.add_api_route("/favicon.ico", favicon, methods=["GET"])
    app.add_api_route("/", index, methods=["GET"])
    app.add_api_route("/api/info", info, methods=["GET"])
    app.add_api_route("/api/traces", traces, methods=["GET"])
    app.add_api_route("/api/traces/{trace_id}", trace, methods=["GET"])
    app.add_api_route("/api/traces/{trace_id}/picture.png", trace_picture, methods=["GET"])
    app.add_api_route("/api/blobs/{sha}", blob, methods=["GET"])
    app.add_api_route("/api/filter", filter_page, methods=["GET"])
    app.add_api_route("/api/fidelity", fidelity_table, methods=["GET"])
    app.add_api_route("/api/fidelity/{row_id}", fidelity_pair, methods=["GET"])
    app.add_api_route("/api/fidelity/{row_id}/picture.png", fidelity_picture, methods=["GET"])
    app.add_api_route("/api/fidelity/{row_id}/image.png", fidelity_image, methods=["GET"])
    app.add_api_route("/bundle/{name}", bundle_file, methods=["GET"])
    app.add_api_route("/api/draw", draw, methods=["POST"])
    return app


def _page(responses: Any, name: str, scripts: tuple[str, ...]) -> Any:
    tags = "".join(f'<script src="/static/{s}"></script>' for s in (*scripts, "common.js", f"{name}.js"))
    html = string.Template((STATIC / "page.html").read_text(encoding="utf-8")).substitute(
        title=name, scripts=tags
    )

    def page() -> Any:
        return responses.HTMLResponse(html)

    return page
