"""graphdistill.student: the one small model the teacher graph is distilled into.

- ``model``: :class:`~graphdistill.student.model.Student` + ``StudentConfig`` (presets ``tiny``/``small``)
  and ``StudentProtocol`` for user-supplied modules;
- ``tokenizer``: the byte-level BPE trained on the dataset; ``loader``: preprocessing + torch Dataset;
- ``losses`` / ``matching``: distillation losses by name, Hungarian set matching;
- ``train``: the flat recipe (setup / train / save / cleanup); ``predict``: ``load_student(RUN)``.

Submodules import torch; this package file imports nothing heavy.
"""
