"""Guards a child Python process started by a test: no network beyond loopback (see ``_netguard.py``).

Python imports ``sitecustomize`` at start-up from ``sys.path``; a test puts this folder on ``PYTHONPATH``
(``_netguard.subprocess_env``), which also sets ``GRAPHDISTILL_TEST_NO_NETWORK=1``. Without that variable
this file does nothing, so a stray ``PYTHONPATH`` alone changes no behaviour.
"""

from __future__ import annotations

import os

if os.environ.get("GRAPHDISTILL_TEST_NO_NETWORK") == "1":
    import _netguard

    _netguard.install()
