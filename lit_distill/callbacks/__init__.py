"""Lightning callbacks."""
from lit_distill.callbacks.report import DistillReport, EvaluationReport

__all__ = ["DistillReport", "EvaluationReport"]
