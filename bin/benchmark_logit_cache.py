"""Training speed from the teacher-logit cache vs the live teacher, interleaved in one process (A B A B ...).

    OMP_NUM_THREADS=2 python bin/benchmark_logit_cache.py --config configs/distill/smollm2_real.yaml \\
        --cache runs/smollm2_comparison/teacher_cache --rounds 3 --steps 3

Both DistillModules are built from the config (same student weights, same batches); one reads the teacher's
top-k from the cache, the other runs the teacher. Each round times ``--steps`` optimizer steps of each (forward,
loss, backward, AdamW), alternating, after one warm-up step each; the table gives the median tokens/s and the
ratio. The extra memory of the live path is the teacher (its parameters and activations); see the peak RSS of
the arms of ``bin/distill_comparison.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import yaml


def build(config: dict, cache: str | None):
    from lit_distill.cli import distill_module_arguments
    from lit_distill.modules.distill import DistillModule

    init = dict(config["model"]["init_args"], logit_cache={"path": cache} if cache else None, save_dir=None)
    init.pop("optimizer", None), init.pop("lr_scheduler", None)
    torch.manual_seed(0)
    return DistillModule(**vars(distill_module_arguments(init)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--cache", required=True, help="a complete cache of the config's teacher and data")
    parser.add_argument("--data-source", help="override data.init_args.source")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    from lit_distill.data import WikiTextDataModule
    from lit_distill.teachers.logit_cache import LogitCache, cache_size, read_manifest

    config = yaml.safe_load(Path(args.config).read_text())
    data_args = dict(config["data"]["init_args"], **({"source": args.data_source} if args.data_source else {}))
    datamodule = WikiTextDataModule(**data_args)
    datamodule.setup("fit")
    batches = [batch for _, batch in zip(range(args.steps), datamodule.train_dataloader())]
    live, cached = build(config, None), build(config, args.cache)
    cached.model.load_state_dict(live.model.state_dict())
    cached.logit_cache = LogitCache(args.cache, read_manifest(Path(args.cache)))
    lr = config["model"]["init_args"]["optimizer"]["init_args"]["lr"]
    optimizers = {name: torch.optim.AdamW(module.model.parameters(), lr=lr) for name, module in
                  (("live", live), ("cache", cached))}
    modules = {"live": live, "cache": cached}

    def steps(name: str, count: int) -> float:
        module, optimizer = modules[name], optimizers[name]
        tokens, start = 0, time.perf_counter()
        for batch in batches[:count]:
            _, _, loss, stats = module.distill_loss(batch, module.hparams.alpha)
            (loss / stats.num_tokens.clamp(min=1)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += int(batch["attention_mask"].sum())
        return tokens / (time.perf_counter() - start)

    for name in modules:  # warm-up
        steps(name, 1)
    rates = {name: [] for name in modules}
    for _ in range(args.rounds):
        for name in modules:
            rates[name].append(steps(name, args.steps))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    size, tokens = cache_size(args.cache)
    result = {"threads": torch.get_num_threads(), "rounds": rates, "median_tokens_per_s": medians,
              "cache_over_live": medians["cache"] / medians["live"], "top_k": cached.logit_cache.top_k,
              "cache_bytes_per_token": size / tokens}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
