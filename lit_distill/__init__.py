"""lit_distill: distil large causal LMs into small ones and align them (PyTorch Lightning)."""


def __getattr__(name: str):
    # The Python API is imported on first use, so that `import lit_distill` (and the CLI) stays light.
    if name == "DistillationAgent":
        from lit_distill.agent import DistillationAgent

        return DistillationAgent
    raise AttributeError(f"module 'lit_distill' has no attribute '{name}'")
