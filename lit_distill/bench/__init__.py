"""Training-loop benchmarks, alone or side by side with TRL: ``python -m lit_distill.bench --help``.

``workload`` writes the shared models, tokenizer and rows; ``timing`` is the one way a training loop is timed;
each of ``reward``, ``dpo``, ``kd`` and ``grpo`` holds its workloads' ``MEASUREMENTS`` (lit_distill's trainer and,
where TRL has one, TRL's, on the same files and settings).
"""
