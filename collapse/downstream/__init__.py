"""Downstream fine-tuning: the task table, offline probes, loading, the classifier and its loop.

The evaluation that runs it per (generation, task) is `collapse.evals.downstream`.
"""
