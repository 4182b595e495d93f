"""SFT training steps on the embedded SQuAD set, padded against packed: real-token share and throughput.

    OMP_NUM_THREADS=2 python bin/packing_speed.py [--examples 2000] [--max-length 128] [--batch-size 32]

Both sides train one tiny Llama (the SFT quickstart's) with AdamW on the same examples; the rounds alternate
padded and packed (A B A B), and each round times ``--steps`` steps after an untimed warm-up.
"""

import argparse
import logging
import time
from pathlib import Path

import torch
import yaml

from lit_distill.data.squad import SQuADDataModule
from lit_distill.models.loading import ModelSpec
from lit_distill.modules import SFTModule
from lit_distill.modules.sft import token_cross_entropy

SFT_QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "sft" / "quickstart.yaml"


def examples_in(batch: dict) -> int:
    """Examples in a batch: rows, or the starts of packed examples (position 0 on a real token)."""
    if "position_ids" not in batch:
        return len(batch["input_ids"])
    return int(((batch["position_ids"] == 0) & batch["attention_mask"].bool()).sum())


def timed_round(module: SFTModule, optimizer: torch.optim.Optimizer, batches: list[dict]) -> tuple[float, float]:
    """(examples/s, real tokens/s) over ``batches``."""
    start = time.perf_counter()
    for batch in batches:
        loss_sum, num_tokens = token_cross_entropy(module.scored(batch))
        (loss_sum / num_tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
    elapsed = time.perf_counter() - start
    return (sum(examples_in(batch) for batch in batches) / elapsed,
            sum(int(batch["attention_mask"].sum()) for batch in batches) / elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the packing summary line
    torch.manual_seed(0)
    model = yaml.safe_load(SFT_QUICKSTART.read_text())["model"]["init_args"]["model"]
    module = SFTModule(model=ModelSpec(tokenizer=model["tokenizer"], config=model["config"]))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    batches = {}
    for packing in (False, True):
        data = SQuADDataModule(embedded_examples=args.examples, max_length=args.max_length,
                               batch_size=args.batch_size, packing=packing)
        data.setup("fit")
        batches[packing] = list(data.train_dataloader())[:args.steps + 3]
        timed_round(module, optimizer, batches[packing][:3])  # warm-up
    results = {False: [], True: []}
    for _ in range(args.rounds):
        for packing in (False, True):
            results[packing].append(timed_round(module, optimizer, batches[packing][3:]))
    for packing, rounds in results.items():
        examples, tokens = (sum(values) / len(rounds) for values in zip(*rounds))
        print(f"{'packed' if packing else 'padded'}: {examples:.0f} examples/s, {tokens:.0f} real tokens/s")


if __name__ == "__main__":
    main()
