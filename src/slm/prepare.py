"""`slm prepare`: the validation split, the tokenizer, and train.bin / val.bin token files with meta.json,
written whole or not at all (slm.outputs). slm.corpus reads the inputs; slm.data reads what this writes.

One module of ~440 lines because it is one pipeline (split -> tokenizer -> encode -> check -> meta), each step
a function or a small class that the next one takes."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from slm.config import setting
from slm.corpus import DataError, count_documents, iter_hf_dataset, list_files, read_documents
from slm.files import atomic_write_json
from slm.instruct import MAX_WORDS, N_WORDS, STORY_CHARS, TEMPLATE, instruct_documents
from slm.outputs import new_directory
from slm.tokenizer import Tokenizer


def is_validation(index: int, seed: int, fraction: float) -> bool:
    """Deterministic split by document: a hash of (seed, index) decides, independent of everything else."""
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


# ---- the validation split -------------------------------------------------------------------------------
# "documents": whole documents, chosen by hash (no text of a validation document is ever trained on).
# "tail": the last fraction of every document (nanoGPT's split of one long text), used when the corpus has
# too few documents for a document split: one novel, a handful of files.
SPLIT_MODES = ("auto", "documents", "tail")
MIN_VAL_DOCUMENTS = 5  # a document split expects at least this many validation documents


def choose_split(split: str, n_docs: int, fraction: float) -> str:
    if split not in SPLIT_MODES:
        raise DataError(f"--split {split!r}: choose {', '.join(SPLIT_MODES)}")
    if split != "auto":
        return split
    return "documents" if n_docs * fraction >= MIN_VAL_DOCUMENTS else "tail"


def tail_cut(text: str, fraction: float) -> int:
    """Where the last ``fraction`` of a text starts: at the next line break (or space) after that point."""
    cut = max(1, int(len(text) * (1 - fraction)))  # at least one character to train on
    for sep in ("\n", " "):
        nxt = text.find(sep, cut, cut + 2000)
        if nxt != -1:
            return nxt + 1
    return cut


# ---- long texts in pieces --------------------------------------------------------------------------------
# A document longer than this (a book with no line breaks, a whole corpus in one line) is tokenized in pieces
# of about this many characters, so that memory does not grow with it: the tokenizer's trainer and encoder
# hold many bytes for every character they are given at once. Sizes measured in docs/preparing-data.md.
PIECE_CHARS = 100_000
ENCODE_BATCH_CHARS = 1_000_000  # characters encoded in one parallel batch
WORD_END = re.compile(r"\S(?=\s)")
NON_SPACE = re.compile(r"\S")


def piece_ends(text: str, start: int, end: int, size: int = PIECE_CHARS) -> list[int]:
    """Where the pieces of ``text[start:end]`` end (the last is ``end``): each cut after a word and before the
    whitespace that follows it, where GPT-2's pre-tokenization splits anyway, so the pieces' tokens are the
    whole text's. A stretch of ``size`` characters with no whitespace at all is cut where it reaches ``size``."""
    ends = []
    while end - start > size:
        found = WORD_END.search(text, start + size - 1, min(end, start + 2 * size))
        start = found.end() if found else start + size
        ends.append(start)
    return [*ends, end]


# ---- prepare --------------------------------------------------------------------------------------------
@dataclass
class SplitStats:
    documents: int = 0
    characters: int = 0
    bytes: int = 0
    tokens: int = 0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["bytes_per_token"] = self.bytes / self.tokens if self.tokens else 0.0
        return d


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class Doc(NamedTuple):
    is_val: bool
    text: str
    source: int  # index of its input in meta["sources"]
    header: str = ""  # instruct documents: the request before the story (no loss on it with --loss-on story)
    ends: bool = True  # False: a part cut from a longer document (an instruct part, a split's head); its
    # <|endoftext|> is not learned either
    closes: bool = True  # False: a piece of a long text that the next Doc continues (no <|endoftext|> between)


@dataclass
class Corpus:
    """The inputs of one `slm prepare` and how they are split; reads them as often as a pass needs."""

    files: list[Path]
    config: PrepareConfig
    mode: str  # "documents" or "tail" (see SPLIT_MODES)
    instruct: list[int]  # indices of the inputs that are also written in the instruct format

    @property
    def hf_dataset(self) -> str | None:
        return self.config.hf_dataset

    @property
    def val_fraction(self) -> float:
        return self.config.val_fraction

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def names(self) -> list[str]:
        names = [str(f) for f in self.files] + ([f"hf:{self.hf_dataset}"] if self.hf_dataset else [])
        return names + [f"instruct:{self.files[i].name}" for i in self.instruct]

    def read(self, source: int) -> Iterator[str]:
        field = self.config.text_field
        texts = read_documents(self.files[source], field) if source < len(self.files) else \
            iter_hf_dataset(self.hf_dataset or "", field)
        return (t for t in texts if t.strip())

    def split(self, text: str, index: int) -> Iterator[tuple[bool, int, int, bool]]:
        """(is validation, start, end, whether the document ends there) for one document: whole, or its head
        and its held-out tail (the head's <|endoftext|> is not the document's end when a tail follows)."""
        if self.mode == "documents":
            yield is_validation(index, self.seed, self.val_fraction), 0, len(text), True
            return
        cut = tail_cut(text, self.val_fraction) if self.val_fraction else len(text)
        head_kept, tail_kept = NON_SPACE.search(text, 0, cut) is not None, NON_SPACE.search(text, cut) is not None
        if head_kept:
            yield False, 0, cut, not tail_kept
        if tail_kept:
            yield True, cut, len(text), True

    def parts(self, text: str, index: int) -> Iterator[tuple[bool, str, bool]]:
        """(is validation, text, whether the document ends there) of each side of the split, as text."""
        for is_val, start, end, ends in self.split(text, index):
            yield is_val, text[start:end], ends

    def plain_documents(self, text: str, index: int, source: int) -> Iterator[Doc]:
        """One document's Docs: each side of its split, a long one in pieces (piece_ends)."""
        for is_val, start, end, ends in self.split(text, index):
            cuts = piece_ends(text, start, end)
            for a, b in itertools.pairwise([start, *cuts]):
                yield Doc(is_val, text[a:b], source, ends=ends, closes=b == end)

    def documents(self) -> Iterator[Doc]:
        """Every document, input by input (so each input's tokens are contiguous), then the instruct copies of
        the chosen inputs, each on the same side of the split as its plain original."""
        n_plain = len(self.files) + bool(self.hf_dataset)
        first_index, index = [], 0  # a document's index decides its split
        for source in range(n_plain):
            first_index.append(index)
            for text in self.read(source):
                yield from self.plain_documents(text, index, source)
                index += 1
        for k, source in enumerate(self.instruct):
            for index, text in enumerate(self.read(source), first_index[source]):
                for is_val, part, part_ends in self.parts(text, index):
                    for head, story, ends in instruct_documents(part, self.seed, self.config.instruct_words,
                                                                self.config.instruct_part_chars):
                        yield Doc(is_val, story, n_plain + k, head, ends and part_ends)


def instruct_inputs(files: list[Path], spec: str) -> list[int]:
    """--instruct "tinystories,fables": the inputs whose file names start with one of the names."""
    chosen: list[int] = []
    for key in filter(None, (k.strip() for k in spec.split(","))):
        matches = [i for i, f in enumerate(files) if f.name.startswith(key)]
        if not matches:
            raise DataError(f"--instruct: no input file name starts with {key!r} "
                            f"(inputs: {', '.join(f.name for f in files)})")
        chosen += [i for i in matches if i not in chosen]
    return chosen


def train_tokenizer(corpus: Corpus, vocab_size: int, progress: bool) -> Tokenizer:
    """A BPE trained on the plain training documents only (streamed)."""
    count = 0

    def texts() -> Iterator[str]:
        nonlocal count
        with tqdm(desc="training tokenizer", unit=" docs", disable=not progress) as bar:
            for doc in corpus.documents():
                if doc.header:
                    break  # the instruct copies come last and add nothing new
                count += 1
                bar.update()
                if not doc.is_val:
                    yield doc.text

    tok = Tokenizer.train(texts(), vocab_size=vocab_size)
    if count == 0:
        raise DataError("the corpus is empty: no non-blank documents in the inputs")
    if tok.vocab_size < vocab_size:
        print(f"warning: --vocab-size {vocab_size:,}: the corpus has no more pairs to merge (each pair must occur "
              f"twice) after {tok.vocab_size:,} tokens, so the tokenizer has {tok.vocab_size:,}", file=sys.stderr)
    return tok


def choose_tokenizer(corpus: Corpus, tokenizer: str | None, vocab_size: int, progress: bool) -> Tokenizer:
    if tokenizer is None:
        return train_tokenizer(corpus, vocab_size, progress)
    if tokenizer == "gpt2":
        return Tokenizer.gpt2()
    return Tokenizer.load(tokenizer_path(tokenizer))


class TokenWriter:
    """Appends encoded documents to train/val token files (``.tmp`` until :meth:`commit`), counting each split's
    statistics and each input's tokens; with a header in the corpus, also a loss mask per token (1 = learn it)."""

    SPLITS = ("train", "val")

    def __init__(self, out: Path, tok: Tokenizer, n_sources: int, masks: bool, progress: bool) -> None:
        self.out, self.tok, self.masks = out, tok, masks
        self.dtype = token_dtype(tok.vocab_size)
        self.stats = {s: SplitStats() for s in self.SPLITS}
        self.source_tokens = {s: [0] * n_sources for s in self.SPLITS}
        self.stack = contextlib.ExitStack()
        self.files = {name: self.stack.enter_context(open(out / f"{name}.tmp", "wb"))  # noqa: SIM115
                      for name in self.file_names()}
        self.bar = self.stack.enter_context(tqdm(desc="encoding", unit="B", unit_scale=True, disable=not progress))

    def file_names(self) -> list[str]:
        return [f"{s}.bin" for s in self.SPLITS] + ([f"{s}.mask" for s in self.SPLITS] if self.masks else [])

    def write(self, batch: list[Doc]) -> None:
        texts = self.tok.encode_batch([d.text for d in batch])
        headers = self.tok.encode_batch([d.header for d in batch]) if self.masks else [[] for _ in batch]
        for doc, head, ids in zip(batch, headers, texts, strict=True):
            split = "val" if doc.is_val else "train"
            eot = [self.tok.eot_id] if doc.closes else []  # documents are separated by <|endoftext|>
            n = len(head) + len(ids) + len(eot)
            self.files[f"{split}.bin"].write(np.asarray(head + ids + eot, dtype=self.dtype).tobytes())
            if self.masks:  # the header is the request, and a cut part's end is not a story's end: neither is learned
                self.files[f"{split}.mask"].write(bytes(len(head)) + b"\x01" * len(ids) + bytes([doc.ends] * len(eot)))
            self.source_tokens[split][doc.source] += n
            stats, n_bytes = self.stats[split], len((doc.header + doc.text).encode("utf-8"))
            stats.documents += doc.closes
            stats.characters += len(doc.header) + len(doc.text)
            stats.bytes += n_bytes
            stats.tokens += n
            self.bar.update(n_bytes)

    def close(self) -> None:
        self.stack.close()

    def discard(self) -> None:
        self.close()
        for name in self.file_names():
            (self.out / f"{name}.tmp").unlink(missing_ok=True)

    def commit(self) -> None:
        self.close()
        for name in self.file_names():
            (self.out / f"{name}.tmp").replace(self.out / name)


def encode_corpus(corpus: Corpus, writer: TokenWriter, batch_chars: int) -> None:
    """Encode in batches (parallel in Rust) and append to the token files."""
    batch: list[Doc] = []
    chars = 0
    for doc in corpus.documents():
        batch.append(doc)
        chars += len(doc.text)
        if chars >= batch_chars:
            writer.write(batch)
            batch, chars = [], 0
    if batch:
        writer.write(batch)


def check_splits(stats: dict[str, SplitStats], corpus: Corpus, asked_split: str) -> str | None:
    """None when both splits can be used; "retry" when a document split should fall back to tails; else raise."""
    if stats["train"].documents + stats["val"].documents == 0:
        raise DataError("the corpus is empty: no non-blank documents in the inputs")
    if stats["train"].tokens == 0:
        raise DataError("every document went to validation; lower --val-fraction")
    if not corpus.val_fraction or stats["val"].tokens:
        return None
    if corpus.mode == "documents" and asked_split == "auto":  # the hash drew no document: hold out each tail
        return "retry"
    if corpus.mode == "documents":
        raise DataError(f"--split documents drew no validation document from {stats['train'].documents:,} "
                        f"at --val-fraction {corpus.val_fraction}; use --split auto or tail, or a larger "
                        "--val-fraction")
    raise DataError(f"the corpus is too small to hold out a validation split ({stats['train'].characters:,} "
                    "characters); add more text, raise --val-fraction, or pass --val-fraction 0 to train "
                    "without validation")


@dataclass(frozen=True)
class PrepareConfig:
    """`slm prepare`'s settings: each field is one flag (cli.add_settings), its default and help written here."""

    vocab_size: int = setting(8192, "BPE vocabulary to train")
    tokenizer: str | None = setting(None, "reuse a tokenizer: a model ('default', a checkpoint or run directory), "
                                    "a tokenizer.json, or 'gpt2'; use the model's own to fine-tune it "
                                    "(slm train --init-from)")
    val_fraction: float = setting(0.01, "share held out for validation, in [0, 1)")
    split: str = setting("auto", "validation by whole documents, or the tail of each document (auto: documents "
                         "when there are enough of them)", choices=SPLIT_MODES)
    seed: int = setting(0, "seed of the train/validation split (and of the instruct words drawn)")
    text_field: str = setting("text", "JSONL/parquet field holding the text")
    hf_dataset: str | None = setting(None, "also stream this Hugging Face dataset (needs `datasets` + network)")
    instruct: str = setting("", "also write these inputs (file name starts, e.g. tinystories,fables) as stories "
                            "that follow a request ('Words: ... / Features: ... / Story:'), as inputs named "
                            "instruct:FILE for --mix", metavar="NAMES")
    instruct_words: int = setting(N_WORDS, f"words in each instruct header (1-{MAX_WORDS})")
    instruct_part_chars: int = setting(STORY_CHARS, "instruct copies cut long documents into parts of about this "
                                       "many characters, each with its own header")

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not 1 <= self.instruct_words <= MAX_WORDS:
            raise DataError(f"--instruct-words must be between 1 and {MAX_WORDS}, got {self.instruct_words}")
        if self.instruct_part_chars < 100:
            raise DataError(f"--instruct-part-chars must be at least 100, got {self.instruct_part_chars}")


def prepare(inputs: list[str | Path], out_dir: str | Path, progress: bool = True,
            batch_chars: int = ENCODE_BATCH_CHARS,
            force: bool = False, **settings: object) -> dict:
    """Tokenize a corpus into ``out_dir`` (train.bin, val.bin, tokenizer.json, meta.json); returns the meta.

    ``settings``: PrepareConfig's fields. ``split``: "documents", "tail" (see SPLIT_MODES above) or "auto": documents
    when the corpus has enough of them for ``val_fraction``, else tail; a document split that happens to draw no
    document falls back to tail. ``instruct``: names of inputs (file name starts) also written in the instruct
    format (slm.instruct), as extra inputs "instruct:<file name>", with a loss mask (train.mask, val.mask) that
    leaves out their headers.

    ``out_dir`` must be new or empty unless ``force``; it is written as a whole or not at all (slm.outputs).
    """
    cfg = PrepareConfig(**settings)  # type: ignore[arg-type]
    files = list_files(inputs) if inputs else []
    if not files and not cfg.hf_dataset:
        raise DataError("no input given: pass files or directories, or --hf-dataset NAME")
    sources = [*files, *([tokenizer_path(cfg.tokenizer)] if cfg.tokenizer not in (None, "gpt2") else [])]
    with new_directory(out_dir, sources, force) as out:
        return prepare_into(out, Corpus(files, cfg, "", instruct_inputs(files, cfg.instruct)), progress,
                            batch_chars)


def prepare_into(out: Path, corpus: Corpus, progress: bool, batch_chars: int) -> dict:
    """prepare()'s work, in the directory ``out``."""
    cfg, started, tok = corpus.config, time.time(), None
    n_docs = float("inf") if cfg.hf_dataset else count_documents(corpus.files)
    for mode in [choose_split(cfg.split, n_docs, cfg.val_fraction), "tail"]:
        corpus.mode = mode
        tok = tok or choose_tokenizer(corpus, cfg.tokenizer, cfg.vocab_size, progress)
        writer = TokenWriter(out, tok, len(corpus.names), bool(corpus.instruct), progress)
        try:
            encode_corpus(corpus, writer, batch_chars)
        except BaseException:
            writer.discard()
            raise
        if check_splits(writer.stats, corpus, cfg.split) is None:
            break
        writer.discard()
    tok.save(out / "tokenizer.json")
    writer.commit()
    meta = prepared_meta(corpus, tok, writer, round(time.time() - started, 1))
    atomic_write_json(out / "meta.json", meta)
    return meta


def prepared_meta(corpus: Corpus, tok: Tokenizer, writer: TokenWriter, seconds: float) -> dict:
    """meta.json: what was prepared from what, and how (training and `slm train --mix` read it)."""
    return {
        "inputs": corpus.names,
        "sources": source_ranges(corpus.names, writer.source_tokens),
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": writer.dtype.name,
        "val_fraction": corpus.val_fraction,
        "split": corpus.mode if corpus.val_fraction else "none",
        "seed": corpus.seed,
        "instruct": {"template": TEMPLATE, "inputs": corpus.names[-len(corpus.instruct):],
                     "words": corpus.config.instruct_words, "part_chars": corpus.config.instruct_part_chars}
        if corpus.instruct else None,
        "seconds": seconds,
        **{name: s.to_dict() for name, s in writer.stats.items()},
    }


def tokenizer_path(name: str) -> Path:
    """--tokenizer: a tokenizer.json, a directory holding one, or a model name ("default", a run directory)."""
    from slm.checkpoint import resolve

    path = Path(name)
    return path if path.is_file() or (path / "tokenizer.json").is_file() else resolve(name)


def source_ranges(names: list[str], source_tokens: dict[str, list[int]]) -> list[dict]:
    """Each input's [start, end) token range in train.bin and val.bin (inputs are written one after another)."""
    ranges = [{"input": name} for name in names]
    for split, counts in source_tokens.items():
        ends = np.cumsum(counts).tolist()
        for r, n, end in zip(ranges, counts, ends, strict=True):
            r[split] = [end - n, end]
    return ranges
