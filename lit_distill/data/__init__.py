"""LightningDataModules, datasets, readers and the embedded offline corpus."""
from lit_distill.data.curriculum import CurriculumDataModule
from lit_distill.data.hf import HFDataModule
from lit_distill.data.preference import JSONLPreferenceDataModule, SQuADPreferenceDataModule
from lit_distill.data.prompts import JSONLPromptDataModule
from lit_distill.data.questions import QuestionDataModule
from lit_distill.data.squad import SQuADDataModule
from lit_distill.data.text import BilingualDataModule, DialogDataModule, WikiTextDataModule

__all__ = ["BilingualDataModule", "CurriculumDataModule", "DialogDataModule", "HFDataModule",
           "JSONLPreferenceDataModule", "JSONLPromptDataModule", "QuestionDataModule", "SQuADDataModule",
           "SQuADPreferenceDataModule", "WikiTextDataModule"]
