"""Serve the app with uvicorn, on the loopback interface unless the caller explicitly allows another."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from graphdistill._lazy import require
from graphdistill.ui.sources import Sources, UIError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(host: str, allow_remote: bool) -> str | None:
    """None for a loopback host; the warning to show for another one, which ``allow_remote`` must permit."""
    if is_loopback(host):
        return None
    if not allow_remote:
        raise UIError(
            f"--host {host}: not a loopback address; the UI shows your traces to whoever reaches that address, "
            "so binding to it needs --allow-remote"
        )
    return (
        f"serving on {host}: anyone who can reach this address can read the trace store, the dataset and "
        "the bundle (no authentication)"
    )


def make_server(
    src: Sources, *, host: str = DEFAULT_HOST, port: int = 8765, allow_remote: bool = False
) -> Any:
    """A uvicorn server of the app on ``host:port`` (not started: ``.run()`` blocks until interrupted)."""
    warning = check_host(host, allow_remote)
    if warning:
        log.warning(warning)
    uvicorn = require("uvicorn", "ui", purpose="graphdistill ui")
    from graphdistill.ui.app import create_app

    # no websockets and no lifespan events: the app has neither
    config = uvicorn.Config(
        create_app(src), host=host, port=port, log_level="warning", ws="none", lifespan="off"
    )
    return uvicorn.Server(config)


def serve(src: Sources, *, host: str = DEFAULT_HOST, port: int = 8765, allow_remote: bool = False) -> None:
    """Run the app until interrupted (the caller prints where it is and any warning of :func:`check_host`)."""
    make_server(src, host=host, port=port, allow_remote=allow_remote).run()
