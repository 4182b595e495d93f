"""Lightning callbacks."""
from lit_distill.callbacks.cleanup import RemoveEmptyRunFolder
from lit_distill.callbacks.curriculum import Autocurriculum
from lit_distill.callbacks.report import DistillReport, EvaluationReport
from lit_distill.callbacks.samples import PromptSamples

__all__ = ["Autocurriculum", "DistillReport", "EvaluationReport", "PromptSamples", "RemoveEmptyRunFolder"]
