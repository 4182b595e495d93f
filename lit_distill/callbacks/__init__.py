"""Lightning callbacks."""
from lit_distill.callbacks.report import DistillReport

__all__ = ["DistillReport"]
