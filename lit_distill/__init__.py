"""lit_distill: distil large causal LMs into small ones and align them (PyTorch Lightning)."""
