"""Recording: every run of a teacher graph becomes a durable, typed trace.

- ``recorder``: :func:`record` / :class:`TraceRecorder` (a LangGraph callback that writes one trace per run);
- ``batch``: recording many inputs (K samples each, test-time augmentation, resume, worker processes);
- ``inputs`` / ``photos``: making input rows from photos (the built-in ones, held out or not);
- ``replay`` / ``replay_plan``: counterfactual replays of recorded traces from an intermediate node.

(Not ``record/``: ``graphdistill.record`` is the public function, which a subpackage of that name would hide.)
"""
