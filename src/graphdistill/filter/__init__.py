"""Filtering: from a trace store to a dataset.

``vote`` (a consensus per input from its K samples), ``checks`` (cross-node consistency), ``rules`` (user
rules), ``dedup``, ``splits`` (by provenance, held-out photos kept out), ``filtering`` (:func:`filter_store`,
streaming one group at a time) and ``report`` (what was kept and dropped, and why). The dataset format the
filter writes is :mod:`graphdistill.dataset`.
"""
