"""LightningModules, one algorithm per file."""
from lit_distill.modules.distill import DistillModule
from lit_distill.modules.sft import SFTModule

__all__ = ["DistillModule", "SFTModule"]
