"""Shipping a student: ``bundle.export_run`` (programs, int8, the parity gate, the bundle folder), ``programs``
(the ``encode`` and ``decode_step`` programs and their inputs), ``phone_decode`` (the exported decode step),
``quantize``, ``executorch`` / ``onnx`` (the two runtimes) and ``parity`` (the gate's measures). The runtime-only
reader of a bundle is :mod:`graphdistill.runner`."""
