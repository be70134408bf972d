"""``graphdistill ui``: a local web app over a trace store, its filtered dataset, an evaluated run and an
ONNX bundle: browse traces, see the filter's decisions, compare teacher and student, run the student in the
browser. Needs the ``ui`` extra (FastAPI, uvicorn); :mod:`.sources` and :mod:`.views` need neither."""

from graphdistill.ui.serve import DEFAULT_HOST, serve
from graphdistill.ui.sources import Sources, UIError, open_sources

__all__ = ["DEFAULT_HOST", "Sources", "UIError", "open_sources", "serve"]
