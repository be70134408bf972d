"""Rounds of improvement: active learning from unlabelled inputs, self-training with and without filtering,
and the collapse measured per round (:mod:`graphdistill.improve.rounds`)."""
