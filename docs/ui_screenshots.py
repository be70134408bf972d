"""Takes the README's screenshots of `graphdistill ui`: docs/ui-{traces,trace,filter,fidelity,try}.png.

    python docs/ui_screenshots.py DEMO_OUT [PHOTO QUESTION]

DEMO_OUT is a demo's output folder (`graphdistill demo`); the store is opened read-only. Uses Debian's
Chromium through Playwright, as the browser tests do. Each picture is reduced to 256 colours (octree) to stay small.
"""

import socket
import sys
import threading
import time
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

from graphdistill.ui import open_sources
from graphdistill.ui.serve import make_server

DOCS = Path(__file__).parent


def save(page, name):
    path = DOCS / f"ui-{name}.png"
    page.screenshot(path=str(path))
    Image.open(path).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    print(path, path.stat().st_size // 1024, "KB")


def loaded(page, selector):
    page.wait_for_function(
        "s => { const i = document.querySelector(s); return i && i.complete && i.naturalWidth > 0; }",
        arg=selector,
        timeout=300_000,
    )


def main(demo_out, photo=None, question="What is on the table?"):
    src = open_sources(demo_out)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = make_server(src, port=port)
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        page.goto(f"{base}/traces")
        page.wait_for_selector("#rows tr")
        save(page, "traces")
        page.click("#rows tr >> nth=0")
        page.wait_for_selector("#node-output")
        page.click("#node-segment")
        loaded(page, "#node-picture")
        page.evaluate("document.querySelector('#graph').scrollIntoView()")
        save(page, "trace")
        page.goto(f"{base}/filter")
        page.wait_for_selector("#rows tr")
        save(page, "filter")
        page.goto(f"{base}/fidelity")
        page.wait_for_selector("#rows tr")
        page.click("#rows tr >> nth=0")
        loaded(page, "#pair-picture")
        save(page, "fidelity")
        if photo:
            page.goto(f"{base}/try")
            page.wait_for_selector("body[data-ready='1']", state="attached", timeout=300_000)
            page.set_input_files("#photo", photo)
            page.fill("#question", question)
            page.click("#run")
            page.wait_for_selector("body[data-ran='1']", state="attached", timeout=300_000)
            loaded(page, "#picture")
            save(page, "try")
        browser.close()
    server.should_exit = True
    src.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
