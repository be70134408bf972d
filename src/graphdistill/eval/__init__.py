"""graphdistill.eval: how faithful the student is to its teacher, what it saves, and the report.

- :mod:`~graphdistill.eval.metrics`: fidelity on lists of output dicts (teacher as ground truth): answers
  (exact, token F1, meaning), boxes (torchmetrics mAP), masks (matched mIoU), sources (recall@k).
- :mod:`~graphdistill.eval.cost`: warm median latency, model bytes and parameters, peak memory.
- :mod:`~graphdistill.eval.evaluate`: one run on one dataset split -> ``RUN/eval.json``.
- :mod:`~graphdistill.eval.report` / :mod:`~graphdistill.eval.summary`: the self-contained HTML report and
  the Markdown summary.

Nothing is imported here, so ``import graphdistill.eval`` stays light.
"""
