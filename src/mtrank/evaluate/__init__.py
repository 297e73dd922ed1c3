"""Evaluation: metrics over whole splits, gate utilisation reports, tables and figures."""

from mtrank.evaluate.gates import gate_report
from mtrank.evaluate.metrics import evaluate, predict_batches, stacked_task_metrics, task_metrics

__all__ = ["evaluate", "predict_batches", "stacked_task_metrics", "task_metrics", "gate_report"]
