"""Real text from local files: JSONL or Parquet (one row per document with a ``text`` field)
or plain UTF-8 text (one document per file), tokenized once into a random-access token stream,
each document between the tokenizer's BOS and EOS tokens (where it has them).

Documents longer than ``max_length`` are cut into ``max_length`` chunks. Every epoch visits the
documents in a fresh order drawn from ``(seed, epoch)``; micro-batch ``g`` is the stream's
tokens ``[g*R*T, (g+1)*R*T)``, so a batch is a pure function of its index and resume is exact.
A document cut by a batch boundary continues in the next batch as its own document.
"""

from __future__ import annotations

import glob
import json
import warnings
from pathlib import Path

import numpy as np

from distca.batch import PackedBatch
from distca.data.packing import pack
from distca.data.tokenizer import Tokenizer


def data_file(name: str) -> Path:
    """``name`` as a path, checked to be an existing file (the error names ``data.paths``)."""
    path = Path(name)
    if not path.is_file():
        why = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"data.paths: {path} {why}")
    return path


DATA_SUFFIXES = (".jsonl", ".parquet", ".txt")


def expand_paths(names: list[str], key: str = "data.paths") -> list[str]:
    """Files named by ``names``, in order: a file as is, a directory as its data files
    (``.jsonl``, ``.parquet``, ``.txt``, sorted), a glob pattern as its matches (sorted). A name
    that matches nothing is an error naming ``key``."""
    files: list[str] = []
    for name in names:
        path = Path(name)
        if path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if p.suffix in DATA_SUFFIXES)
            what = f"{key}: directory {path} holds no {', '.join(DATA_SUFFIXES)} files"
        elif glob.has_magic(name):
            found = sorted(glob.glob(name, recursive=True))
            what = f"{key}: {name} matches no file"
        else:
            found, what = [name], ""
        if not found:
            raise FileNotFoundError(what)
        files += found
    return files


def jsonl_rows(path: Path):
    """(line number, row) for each non-blank line; a line that is not UTF-8 JSON is passed on
    as its exception, so the caller can name the line or skip it. Each line is decoded on its
    own (one bad byte must not abort the file) and a leading BOM is dropped."""
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8-sig")
                if line.strip():
                    yield number, json.loads(line)
            except ValueError as exc:  # UnicodeDecodeError or json.JSONDecodeError
                yield number, exc


def table_rows(path: Path):
    """(row number, row) of a ``.parquet`` file, else of a JSONL file (see :func:`jsonl_rows`)."""
    if path.suffix != ".parquet":
        yield from jsonl_rows(path)
        return
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from exc
    yield from enumerate(pq.read_table(path).to_pylist(), 1)


def _plain_text(path: Path) -> str:
    """The file as UTF-8 text; binary or other encodings are refused, never replaced (a
    latin-1 file would otherwise train on U+FFFD characters)."""
    data = path.read_bytes()
    if b"\0" in data:  # a compressed or binary file would otherwise train on its bytes
        raise ValueError(f"data.paths: {path} is not a text file (it has NUL bytes); "
                         f"data.kind=text reads .jsonl, .parquet and plain text files")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"data.paths: {path}: not valid UTF-8 at byte {exc.start} "
                         f"({data[exc.start:exc.start + 1]!r}); convert it, e.g. "
                         f"`iconv -f latin1 -t utf-8`") from None


def read_documents(paths: list[str], skip_bad_rows: bool = False) -> tuple[list[str], int]:
    """The text of every document in ``paths`` and the number of bad rows skipped; errors name
    the file (and line) at fault."""
    docs: list[str] = []
    skipped = 0
    for name in paths:
        path = data_file(name)
        if path.suffix not in (".jsonl", ".parquet"):
            docs.append(_plain_text(path))
            continue
        for number, row in table_rows(path):
            if isinstance(row, ValueError):
                problem = f"not valid UTF-8 JSON: {row}"
            elif not isinstance(row, dict) or not isinstance(row.get("text"), str):
                problem = "not an object with a `text` string"
            else:
                docs.append(row["text"])
                continue
            if not skip_bad_rows:
                raise ValueError(f"{path}:{number}: bad row ({problem}); "
                                 f"data.skip_bad_rows=true skips such rows")
            skipped += 1
    if skipped:
        warnings.warn(f"skipped {skipped} bad rows in {', '.join(paths)}", stacklevel=2)
    return docs, skipped


class TextData:
    def __init__(self, paths: list[str], tokenizer: Tokenizer, max_length: int, seed: int,
                 skip_bad_rows: bool = False):
        pieces: list[np.ndarray] = []
        texts, self.skipped_rows = read_documents(paths, skip_bad_rows)
        # each document is framed by the tokenizer's BOS/EOS (those it has), as pretraining
        # corpora are: the model learns where documents start and end
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        for text in texts:
            ids = np.concatenate([np.asarray(bos, np.int64), tokenizer.encode(text),
                                  np.asarray(eos, np.int64)])
            pieces.extend(ids[i:i + max_length] for i in range(0, ids.size, max_length))
        if not pieces:
            raise ValueError(f"data.paths: no tokens in {', '.join(paths)}")
        self.tokens = np.concatenate(pieces)  # (N,) int64, documents back to back
        self.doc_lengths = np.asarray([p.size for p in pieces], dtype=np.int64)
        self._doc_starts = np.cumsum(self.doc_lengths) - self.doc_lengths
        self.seed = seed
        self._epoch = -1
        self._order = self._ends = None

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    def _use_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.permutation(self.doc_lengths.size)
            self._ends = np.cumsum(self.doc_lengths[self._order])
            self._epoch = epoch

    def _take(self, position: int, count: int) -> list[np.ndarray]:
        """Document pieces covering stream tokens ``[position, position + count)``."""
        out: list[np.ndarray] = []
        while count > 0:
            epoch, offset = divmod(position, self.num_tokens)
            self._use_epoch(epoch)
            k = int(np.searchsorted(self._ends, offset, side="right"))
            doc = self._order[k]
            into = offset - (int(self._ends[k]) - int(self.doc_lengths[doc]))
            n = min(int(self.doc_lengths[doc]) - into, count)
            start = int(self._doc_starts[doc]) + into
            out.append(self.tokens[start:start + n])
            position += n
            count -= n
        return out

    def micro_batch(self, index: int, num_ranks: int, tokens_per_rank: int) -> PackedBatch:
        total = num_ranks * tokens_per_rank
        return pack(self._take(index * total, total), num_ranks, tokens_per_rank)
