"""LightningDataModules, datasets, readers and the embedded offline corpus."""
from lit_distill.data.text import WikiTextDataModule

__all__ = ["WikiTextDataModule"]
