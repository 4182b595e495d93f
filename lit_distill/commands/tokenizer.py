"""Train the shipped byte-level BPE tokenizer on the embedded corpus.

    python -m lit_distill train-tokenizer                      # rewrites lit_distill/assets/tokenizer
    python -m lit_distill train-tokenizer --out-dir /tmp/tok --vocab-size 2048

The corpus is generated from fixed seeds and BPE training is deterministic, so rerunning the script with the
defaults reproduces the shipped files (tests/test_corpus_tokenizer.py checks this).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lit_distill.data import corpus

EOS = "<|endoftext|>"  # also the bos token and the document separator when packing
PAD = "<|pad|>"  # distinct from eos, so masking padding never masks a real end of text
# Reserved for chat formatting; their ids are fixed now so later features don't change the vocabulary.
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [EOS, PAD, USER, ASSISTANT]


def training_texts(num_documents: int, seed: int = 0) -> Iterator[str]:
    """Every kind of embedded text: documents, QA contexts/questions/answers and arithmetic prompts/answers."""
    yield from corpus.text_documents(num_documents, seed=seed)
    for example in corpus.qa_examples(num_documents // 2, seed=seed):
        yield from (example.context, example.question, example.answer)
    for problem in corpus.arithmetic_problems(num_documents // 2, seed=seed):
        yield from (problem.prompt, problem.answer)


def train(vocab_size: int = 1024, num_documents: int = 4000, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE whose vocabulary (special tokens included) has at most ``vocab_size`` entries."""
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: decode(encode(s)) == s exactly, and a text's first word is not silently changed.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  # All 256 bytes, seen or not, so no input ever needs an unknown token.
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(training_texts(num_documents, seed), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=[USER, ASSISTANT], model_max_length=2048,
                                   clean_up_tokenization_spaces=False)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lit_distill train-tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=corpus.default_tokenizer_path())
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--num-documents", type=int, default=4000,
                        help="text documents to train on (plus half as many QA examples and arithmetic problems)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tokenizer = train(args.vocab_size, args.num_documents, args.seed)
    tokenizer.save_pretrained(args.out_dir)
    print(f"saved a tokenizer of {len(tokenizer)} tokens to {args.out_dir}")

