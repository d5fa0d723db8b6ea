"""Evaluation side of the pipeline: metrics, lambda selection, method tuning and the report.

Part of the ``[train]`` extra; imported only by the commands that need it.
"""
