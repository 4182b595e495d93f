"""Benchmarks, in one command: ``python -m lit_distill bench --help``.

``workload`` writes the shared models, tokenizer and rows (tiny or SmolLM2); ``timing`` is the one way a training
loop is timed and the A B A B interleaving; ``trainers`` the settings both sides of a comparison share. One module
per measurement: ``reward``, ``dpo``, ``kd`` (off- and on-policy) and ``grpo`` hold training-loop
``MEASUREMENTS`` (lit_distill's trainer and TRL's on the same files and settings); ``sampling`` (ours vs HF
``generate``), ``mfu`` (a KD step's share of the matmul peak, vs a naive PyTorch loop) and ``kd_memory`` (the KD
loss's peak memory per chunk size).
"""
