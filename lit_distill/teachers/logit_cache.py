"""A teacher-logit cache: the teacher's top-k log-probabilities at every loss position of a dataset, on disk.

Offline distillation runs the teacher once (``python -m lit_distill cache-teacher --config X.yaml``, or the
first ``fit`` of a config whose ``logit_cache`` is missing), then trains any number of students, for any
number of epochs, with no teacher in memory (``losses.topk_kd_loss``).

Layout of a cache directory::

    cache.json                       what it was built from (teacher, tokenizer, data, k, temperature) and its shards
    train/shard-00000.safetensors    one file per ``shard_examples`` examples of a split, in dataset order
    validation/shard-00000.safetensors

Each shard is a safetensors file (readable with ``safetensors.safe_open`` or ``safetensors.torch.load_file``)
holding, for its E examples and their N loss positions (positions t whose next label is not ignored)::

    keys           (E, 16) uint8    content key of each example (blake2b of its real token ids and labels)
    offsets        (E + 1,) int64   example e's positions are rows offsets[e]:offsets[e+1]
    topk_ids       (N, K) uint16 (int32 for vocabularies over 65,536 tokens)
    topk_logprobs  (N, K) float16   log p_T of those ids at the cache's temperature
    tail_logprob   (N,) float32     log(1 − Σ_k p_T(k)), computed from the full distribution
    label_logprob  (N,) float32     log p_T(label) at temperature 1 (exact teacher perplexity)

Examples are found by content, not by index, so a run may shuffle, shard across ranks or pad differently. A
shard is written to a temporary name and renamed when complete, so a killed build leaves only whole shards,
and a rebuild writes only the missing ones. Each shard's metadata names the manifest it belongs to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, Optional, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from lit_distill.data.collate import IGNORE_INDEX
from lit_distill.losses.topk_kd import tail_log_prob
from lit_distill.models.forward import causal_lm_logits
from lit_distill.models.loading import ModelSpec, build_model

FORMAT = "lit_distill.teacher_logits"
VERSION = 1
MANIFEST = "cache.json"
_ROWS_PER_SOFTMAX = 512  # loss positions turned into fp32 log-probs at once while building (bounds memory)


class LogitCacheError(ValueError):
    """A teacher cache is missing, incomplete, damaged or was built from other inputs (the message says which)."""


@dataclass
class LogitCacheSpec:
    """Where a teacher-logit cache lives and how it is built.

    Attributes:
        path: the cache directory.
        top_k: log-probabilities kept per position (with one tail bucket for the rest of the mass).
        splits: the DataModule splits to cache (validation too, so that validation needs no teacher).
        batch_size: examples per teacher forward pass while building.
        shard_examples: examples per shard file (the unit of resumption after a crash).
        endpoint: build the cache from an OpenAI-compatible endpoint's log-probabilities instead of a local
            teacher: the arguments of :class:`lit_distill.teachers.http_logits.HTTPLogitScorer` (``base_url``,
            ``model``, ``api_key_env``, ...).
    """

    path: str
    top_k: int = 64
    splits: list[str] = field(default_factory=lambda: ["train", "validation"])
    batch_size: int = 8
    shard_examples: int = 512
    endpoint: Optional[dict[str, Any]] = None

    def __post_init__(self):
        if self.top_k < 1:
            raise LogitCacheError(f"logit_cache.top_k must be >= 1, got {self.top_k}")
        if self.batch_size < 1 or self.shard_examples < 1:
            raise LogitCacheError(f"logit_cache.batch_size and shard_examples must be >= 1, got "
                                    f"{self.batch_size} and {self.shard_examples}")


class TopKScorer(Protocol):
    """A teacher that is not a local model (e.g. an endpoint): what the cache needs of it.

    ``identity`` is recorded in the manifest (never a secret). ``topk(batch, top_k, temperature, vocab_size)``
    returns for a collated CPU batch what :func:`teacher_topk` returns for a local model: ``topk_ids`` (N, K)
    int64, ``topk_logprobs`` (N, K) float16, ``tail_logprob`` (N,) and ``label_logprob`` (N,) float32 over the
    batch's loss positions (:func:`loss_positions`) in batch order, and ``counts`` (B,) positions per row. It may
    refuse settings it cannot serve (an endpoint: temperature ≠ 1) with a :class:`LogitCacheError`. A scorer that
    needs the student's tokenizer gets it when built (:func:`cache_teacher`).
    """

    identity: dict

    def topk(self, batch: dict, top_k: int, temperature: float, vocab_size: int) -> dict[str, Tensor]: ...


class CachedTeacherOutputs(NamedTuple):
    """The teacher's cached values for a batch, dense over its shifted positions (B, T − 1); zeros where masked.

    Attributes:
        topk_ids: (B, T − 1, K) int64.
        topk_logprobs: (B, T − 1, K) float32.
        tail_logprob: (B, T − 1) float32.
        label_logprob: (B, T − 1) float32.
    """

    topk_ids: Tensor
    topk_logprobs: Tensor
    tail_logprob: Tensor
    label_logprob: Tensor


# ---- what identifies a cache -------------------------------------------------------------------------------
def loss_positions(batch: dict) -> Tensor:
    """(B, T − 1) bool: the shifted positions whose next-token label is used by the loss."""
    return batch["labels"][:, 1:] != IGNORE_INDEX


def example_keys(batch: dict) -> list[bytes]:
    """A 16-byte content key per row: its real tokens and the labels after the first (which nothing predicts),
    whatever the padding."""
    keys = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        real = mask.bool()
        digest = hashlib.blake2b(digest_size=16)
        digest.update(ids[real].to(torch.int64).numpy().tobytes())
        digest.update(labels[real][1:].to(torch.int64).numpy().tobytes())
        keys.append(digest.digest())
    return keys


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token → id) and the special tokens."""
    payload = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens])
    return hashlib.sha256(payload.encode()).hexdigest()


def split_loader(datamodule, split: str, batch_size: int, indices: Optional[range] = None) -> DataLoader:
    """The examples of ``split`` (or of ``indices`` in it) in dataset order, collated as the DataModule does."""
    datasets = getattr(datamodule, "datasets", None)
    if not isinstance(datasets, dict) or split not in datasets:
        raise LogitCacheError(f"{type(datamodule).__name__} has no '{split}' dataset to cache: the teacher cache "
                                "reads a DataModule's `datasets[split]` and `collate_fn(split)` (the package's "
                                "DataModules have them); remove the split from logit_cache.splits if not needed")
    dataset = datasets[split]
    return DataLoader(dataset if indices is None else Subset(dataset, indices), batch_size=batch_size,
                      shuffle=False, collate_fn=datamodule.collate_fn(split))


def data_fingerprint(datamodule, split: str, batch_size: int) -> dict:
    """The number of examples of a split and a sha256 of their content keys in order."""
    digest, count = hashlib.sha256(), 0
    for batch in split_loader(datamodule, split, batch_size):
        for key in example_keys(batch):
            digest.update(key)
            count += 1
    return {"examples": count, "data": digest.hexdigest()}


def cache_teacher(spec: LogitCacheSpec, teacher: Optional[ModelSpec], tokenizer) -> TopKScorer | ModelSpec:
    """What the cache is built from: the spec's endpoint when it names one (an
    :class:`~lit_distill.teachers.http_logits.HTTPLogitScorer` mapping the endpoint's tokens to ``tokenizer``, the
    student's), else the local ``teacher``."""
    if spec.endpoint is not None:
        from lit_distill.teachers.http_logits import scorer_from_endpoint

        return scorer_from_endpoint(spec.endpoint, tokenizer)
    if teacher is None:
        raise LogitCacheError("a logit cache needs a teacher: the module's `teacher` or logit_cache.endpoint")
    return teacher


def teacher_identity(teacher: TopKScorer | ModelSpec) -> dict:
    """The manifest's record of the teacher: a local model's spec, or a scorer's own ``identity``."""
    return dataclasses.asdict(teacher) if isinstance(teacher, ModelSpec) else teacher.identity


def expected_manifest(spec: LogitCacheSpec, teacher: TopKScorer | ModelSpec, tokenizer, temperature: float,
                      datamodule) -> dict:
    """The manifest a cache of these inputs has (the data part computed from ``datamodule``'s splits)."""
    return {"format": FORMAT, "version": VERSION, "teacher": teacher_identity(teacher),
            "tokenizer": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer),
            "top_k": min(spec.top_k, len(tokenizer)),
            "temperature": float(temperature), "shard_examples": spec.shard_examples,
            "splits": {split: data_fingerprint(datamodule, split, spec.batch_size) for split in spec.splits}}


def _manifest_digest(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def read_manifest(path: Path) -> Optional[dict]:
    """The cache's manifest, or None when the directory holds none yet."""
    file = path / MANIFEST
    if not file.exists():
        return None
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise LogitCacheError(f"{file}: not a teacher-cache manifest ({err.msg}); delete the directory to "
                                "rebuild the cache") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise LogitCacheError(f"{file}: not a version-{VERSION} {FORMAT} manifest")
    return manifest


def check_manifest(path: Path, found: dict, expected: dict) -> None:
    """Refuse a cache built from other inputs, naming each field that differs."""
    differences = []
    for name in ("teacher", "tokenizer", "top_k", "temperature"):
        if found.get(name) != expected[name]:
            differences.append(f"{name}: cache has {found.get(name)!r}, this run {expected[name]!r}")
    for split, data in expected["splits"].items():
        cached = found["splits"].get(split)
        if cached is None:
            differences.append(f"data: split '{split}' is not in the cache (it has {sorted(found['splits'])})")
        elif cached != data:
            differences.append(f"data: split '{split}' differs (cache {cached['examples']} examples, sha256 "
                               f"{cached['data'][:12]}…; this run {data['examples']} examples, "
                               f"{data['data'][:12]}…)")
    if differences:
        raise LogitCacheError(f"teacher cache {path} was built from other inputs than this run's:\n  "
                                + "\n  ".join(differences)
                                + f"\nUse another logit_cache.path, or delete {path} to rebuild it.")


def shard_file(path: Path, split: str, index: int) -> Path:
    return path / split / f"shard-{index:05d}.safetensors"


def num_shards(examples: int, shard_examples: int) -> int:
    return -(-examples // shard_examples)


def missing_shards(path: Path, manifest: dict) -> list[tuple[str, int]]:
    """(split, shard index) of every shard not yet written."""
    return [(split, index) for split, data in manifest["splits"].items()
            for index in range(num_shards(data["examples"], manifest["shard_examples"]))
            if not shard_file(path, split, index).exists()]


# ---- building --------------------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_topk(teacher: torch.nn.Module, batch: dict, top_k: int, temperature: float,
                 vocab_size: int) -> dict[str, Tensor]:
    """The cached values of one collated batch: its loss positions' top-k, tail and label log-probs, rows in
    batch order (N = number of loss positions in the batch), and the number of positions of each example."""
    logits = causal_lm_logits(teacher, batch["input_ids"], batch["attention_mask"],
                              batch.get("position_ids"))[:, :-1]  # (B, T-1, V'); packed rows keep their position ids
    positions = loss_positions(batch)
    # Embedding-padding logits (V' > V) are dropped, as the live loss drops them (align_vocab).
    rows, labels = logits[positions][:, :vocab_size], batch["labels"][:, 1:][positions]  # (N, V), (N,)
    parts = []
    for chunk, chunk_labels in zip(rows.split(_ROWS_PER_SOFTMAX), labels.split(_ROWS_PER_SOFTMAX)):
        chunk = chunk.float()
        log_p = torch.log_softmax(chunk / temperature, dim=-1)  # (n, V)
        values, ids = log_p.topk(top_k, dim=-1)  # (n, K)
        label_log_p = (log_p if temperature == 1.0 else torch.log_softmax(chunk, dim=-1)).gather(
            -1, chunk_labels[:, None]).squeeze(-1)
        parts.append((ids, values, tail_log_prob(log_p, ids), label_log_p))
    ids, values, tail, label_log_p = (torch.cat(column) for column in zip(*parts))
    return {"topk_ids": ids, "topk_logprobs": values.half(), "tail_logprob": tail, "label_logprob": label_log_p,
            "counts": positions.sum(-1)}


def _write_shard(file: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write to a temporary name, then rename: a reader never sees a half-written shard."""
    from safetensors.torch import save_file

    file.parent.mkdir(parents=True, exist_ok=True)
    temporary = file.with_name(f"{file.name}.tmp-{os.getpid()}")
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(temporary), metadata=metadata)
    os.chmod(temporary, 0o644)  # safetensors creates the file owner-only
    os.replace(temporary, file)


def build_logit_cache(spec: LogitCacheSpec, teacher: TopKScorer | ModelSpec, tokenizer, datamodule,
                      temperature: float, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                      barrier: Callable[[], None] = lambda: None, progress: bool = True) -> dict:
    """Make the cache at ``spec.path`` complete for these inputs, writing only the shards it lacks; returns the
    manifest these inputs expect (for :class:`LogitCache`).

    Every rank calls this: rank 0 writes the manifest, the missing shards are shared round-robin between ranks,
    and a local teacher (a ``ModelSpec``) is loaded only where a shard is to be written; ``teacher`` may also be
    a :class:`TopKScorer` (an endpoint).

    Raises:
        LogitCacheError: the directory holds a cache of other inputs (before any model loads).
    """
    path = Path(spec.path)
    datamodule.setup("fit")
    expected = expected_manifest(spec, teacher, tokenizer, temperature, datamodule)
    found = read_manifest(path)
    if found is not None:
        check_manifest(path, found, expected)
    elif rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        (path / f"{MANIFEST}.tmp").write_text(json.dumps(expected, indent=1, sort_keys=True))
        os.replace(path / f"{MANIFEST}.tmp", path / MANIFEST)
    barrier()
    layout = found or expected  # the cache's shard layout, if this run asked for another shard size
    todo = missing_shards(path, layout)[rank::world_size]
    if todo:
        _write_missing(path, todo, layout, spec, teacher, tokenizer, datamodule, device, progress and rank == 0)
    barrier()
    return expected


def _write_missing(path: Path, todo: list[tuple[str, int]], manifest: dict, spec: LogitCacheSpec,
                   teacher: TopKScorer | ModelSpec, tokenizer, datamodule, device, progress: bool) -> None:
    from tqdm.auto import tqdm

    if isinstance(teacher, ModelSpec):
        model = build_model(teacher, tokenizer).eval().requires_grad_(False).to(device)
        score, device = partial(teacher_topk, model), device
    else:
        score, device = teacher.topk, "cpu"
    shard_examples, digest = manifest["shard_examples"], _manifest_digest(manifest)
    total = sum(min(shard_examples, manifest["splits"][split]["examples"] - index * shard_examples)
                for split, index in todo)
    with tqdm(total=total, desc=f"teacher cache {path}", unit="example", disable=not progress) as bar:
        for split, index in todo:
            start = index * shard_examples
            stop = min(start + shard_examples, manifest["splits"][split]["examples"])
            keys, columns = [], []
            for batch in split_loader(datamodule, split, spec.batch_size, range(start, stop)):
                keys += example_keys(batch)
                batch = {name: value.to(device) for name, value in batch.items() if isinstance(value, Tensor)}
                columns.append({name: value.cpu() for name, value in
                                score(batch, manifest["top_k"], manifest["temperature"],
                                      manifest["vocab_size"]).items()})
                bar.update(len(batch["input_ids"]))
            counts = torch.cat([column.pop("counts") for column in columns])
            tensors = {name: torch.cat([column[name] for column in columns]) for name in columns[0]}
            id_dtype = torch.uint16 if manifest["vocab_size"] <= 2 ** 16 else torch.int32
            tensors["topk_ids"] = tensors["topk_ids"].to(id_dtype)
            tensors["keys"] = torch.tensor([list(key) for key in keys], dtype=torch.uint8)
            tensors["offsets"] = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            _write_shard(shard_file(path, split, index), tensors,
                         {"manifest": digest, "split": split, "shard": str(index)})


# ---- reading -----------------------------------------------------------------------------------------------
class LogitCache:
    """Read a complete cache and serve the teacher's values for batches of the data it was built from.

    Shards are opened with ``safetensors.safe_open`` (memory-mapped); an example's rows are read when a batch
    asks for them.

    Args:
        path: the cache directory.
        expected: the manifest this run expects (``expected_manifest``); a cache built from other inputs is
            refused (``LogitCacheError``).
    """

    def __init__(self, path: str | Path, expected: dict):
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise LogitCacheError(f"{self.path} holds no teacher cache ({MANIFEST} is missing); build it with "
                                    "`python -m lit_distill cache-teacher --config <your config>`")
        check_manifest(self.path, manifest, expected)
        missing = missing_shards(self.path, manifest)
        if missing:
            raise LogitCacheError(f"teacher cache {self.path} is incomplete: {len(missing)} shard(s) missing "
                                    f"(first: {shard_file(self.path, *missing[0])}); rerun `python -m lit_distill "
                                    "cache-teacher` with the same config: it writes only those")
        self.manifest = manifest
        self._handles = []
        self._index: dict[bytes, tuple[int, int, int]] = {}
        digest = _manifest_digest(manifest)
        for split, data in manifest["splits"].items():
            for shard in range(num_shards(data["examples"], manifest["shard_examples"])):
                self._open(shard_file(self.path, split, shard), digest)

    def _open(self, file: Path, digest: str) -> None:
        from safetensors import safe_open

        try:
            handle = safe_open(str(file), framework="pt")
            metadata = handle.metadata() or {}
            keys, offsets = handle.get_tensor("keys"), handle.get_tensor("offsets")
            rows = handle.get_slice("topk_ids").get_shape()[0]
        except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
            raise LogitCacheError(f"{file}: damaged shard ({err}); delete it and rerun `python -m lit_distill "
                                    "cache-teacher` to rewrite it") from None
        if metadata.get("manifest") != digest:
            raise LogitCacheError(f"{file} belongs to another cache than {self.path / MANIFEST}; delete it and "
                                    "rerun cache-teacher")
        if int(offsets[-1]) != rows or len(offsets) != len(keys) + 1:
            raise LogitCacheError(f"{file}: inconsistent shard ({len(keys)} keys, {len(offsets)} offsets, "
                                    f"{rows} rows); delete it and rerun cache-teacher")
        handle_index = len(self._handles)
        self._handles.append(handle)
        for row, key in enumerate(keys.numpy()):
            self._index[key.tobytes()] = (handle_index, int(offsets[row]), int(offsets[row + 1]))

    @property
    def top_k(self) -> int:
        return self.manifest["top_k"]

    def __len__(self) -> int:
        return len(self._index)

    def lookup(self, batch: dict) -> CachedTeacherOutputs:
        """The teacher's values for ``batch`` (a collated batch on any device), dense over (B, T − 1).

        Raises:
            LogitCacheError: a row's content is not in the cache, or its loss positions differ in number.
        """
        positions = loss_positions(batch).cpu()  # (B, T-1)
        parts = {name: [] for name in CachedTeacherOutputs._fields}
        for row, key in enumerate(example_keys({name: batch[name].cpu()
                                                for name in ("input_ids", "attention_mask", "labels")})):
            entry = self._index.get(key)
            if entry is None:
                raise LogitCacheError(f"batch row {row} is not in teacher cache {self.path}: the data differs "
                                      "from what was cached (another tokenizer, block size, template or file)")
            handle, start, stop = entry
            if stop - start != int(positions[row].sum()):
                raise LogitCacheError(f"batch row {row} has {int(positions[row].sum())} loss positions, the cache "
                                      f"{stop - start}: a padding position has a label (the first real token's "
                                      "label must be ignored in a left-padded batch)")
            for name in parts:
                parts[name].append(self._handles[handle].get_slice(name)[start:stop])
        shape, k = positions.shape, self.top_k
        out = CachedTeacherOutputs(
            topk_ids=torch.zeros(*shape, k, dtype=torch.long), topk_logprobs=torch.zeros(*shape, k),
            tail_logprob=torch.zeros(shape), label_logprob=torch.zeros(shape))
        for name, dense in zip(CachedTeacherOutputs._fields, out):
            if parts[name]:
                dense[positions] = torch.cat(parts[name]).to(dense.dtype)
        device = batch["input_ids"].device
        return CachedTeacherOutputs(*(tensor.to(device) for tensor in out))


def cache_size(path: str | Path) -> tuple[int, int]:
    """(bytes of the shard files, cached positions) of a cache directory."""
    from safetensors import safe_open

    shards = sorted(Path(path).glob("*/shard-*.safetensors"))
    positions = sum(safe_open(str(shard), framework="pt").get_slice("tail_logprob").get_shape()[0]
                    for shard in shards)
    return sum(shard.stat().st_size for shard in shards), positions


def config_summary(manifest: dict[str, Any]) -> str:
    """One line describing a cache, for logs."""
    examples = ", ".join(f"{split} {data['examples']}" for split, data in manifest["splits"].items())
    teacher = manifest["teacher"].get("name_or_path") or manifest["teacher"].get("model")
    return (f"top-{manifest['top_k']} at T={manifest['temperature']} of {teacher} "
            f"({examples} examples)")

