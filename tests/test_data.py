import json

import pytest
import torch

from lit_distill.data.io import DataFileError, read_jsonl
from lit_distill.data.text import WikiTextDataModule, keep_line, pack


def test_keep_line_drops_empty_short_and_heading_lines():
    assert not keep_line("   ", 5, True)
    assert not keep_line(" short ", 10, True)
    assert not keep_line(" = = Early life = = ", 5, True)
    assert keep_line(" = = Early life = = ", 5, False)
    assert keep_line(" The valley is long and green . ", 10, True)


def test_pack_concatenates_with_separator_and_drops_the_tail():
    blocks = pack([[1, 2, 3], [4, 5], [6]], block_size=4, separator_id=0)
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6]]  # the tail [0] is dropped


def test_embedded_source_builds_disjoint_packed_splits():
    dm = WikiTextDataModule(source="embedded", embedded_documents=200, block_size=32, batch_size=4)
    dm.setup("fit")
    train, val = dm.datasets["train"], dm.datasets["validation"]
    assert len(train) > 50 and len(val) > 0
    item = train[0]
    assert item["input_ids"].shape == (32,) and torch.equal(item["labels"], item["input_ids"])
    assert not torch.equal(train.blocks[0], val.blocks[0])
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape == (4, 32)


def test_train_order_depends_only_on_seed_and_epoch():
    def first_batches(seed, epoch):
        dm = WikiTextDataModule(source="embedded", embedded_documents=100, block_size=16, batch_size=4, seed=seed)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))["input_ids"]

    assert torch.equal(first_batches(0, 1), first_batches(0, 1))
    assert not torch.equal(first_batches(0, 0), first_batches(0, 1))
    assert not torch.equal(first_batches(0, 0), first_batches(1, 0))


def test_local_directory_with_text_and_jsonl_splits(tmp_path):
    lines = [f"Line number {i} of the local corpus , long enough to keep ." for i in range(200)]
    (tmp_path / "train.txt").write_text("\n".join(lines + ["", " = Heading = ", "tiny"]))
    with open(tmp_path / "validation.jsonl", "w") as f:
        for line in lines[:40]:
            f.write(json.dumps({"text": line}) + "\n")
    dm = WikiTextDataModule(source=str(tmp_path), block_size=16)
    dm.setup("fit")
    decoded = dm.tokenizer.decode(dm.datasets["train"].blocks.flatten().tolist())
    assert "Heading" not in decoded and "tiny" not in decoded and "Line number 3 of" in decoded
    assert len(dm.datasets["validation"]) > 0


def test_parquet_file_in_wikitext_shape_is_split_by_fraction(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [" = Valkyria = "] + [f" Sentence {i} about the old valley and its river . " for i in range(400)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "wiki.parquet")
    dm = WikiTextDataModule(source=str(tmp_path / "wiki.parquet"), block_size=32, validation_fraction=0.1)
    dm.setup("fit")
    assert len(dm.datasets["train"]) > 5 * len(dm.datasets["validation"]) > 0


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine line of text here"}\n\n{"text": broken}\n')
    with pytest.raises(DataFileError, match=r"train.jsonl:3: malformed JSON"):
        WikiTextDataModule(source=str(tmp_path)).setup("fit")


def test_jsonl_missing_or_non_string_field(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataFileError, match=r"rows.jsonl:2: missing field\(s\) \['text'\]"):
        read_jsonl(path, required=["text"])
    path.write_text('{"text": 3}\n')
    with pytest.raises(DataFileError, match=r"rows.jsonl:1: field 'text' must be a string"):
        read_jsonl(path, required=["text"], strings=["text"])


def test_missing_file_and_missing_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        WikiTextDataModule(source=str(tmp_path / "nope.txt")).setup("fit")
    (tmp_path / "train.txt").write_text("a line that is long enough to be kept here\n" * 50)
    with pytest.raises(FileNotFoundError, match="no validation file"):
        WikiTextDataModule(source=str(tmp_path)).setup("fit")


def test_empty_dataset_after_filtering_is_a_clear_error(tmp_path):
    (tmp_path / "train.txt").write_text("short\n\n = H = \n")
    (tmp_path / "validation.txt").write_text("short\n")
    with pytest.raises(ValueError, match="train split .* is empty after filtering"):
        WikiTextDataModule(source=str(tmp_path)).setup("fit")
