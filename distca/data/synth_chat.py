"""Synthetic long-context chat tasks as training data (``data.kind=synth``) and as files
(``distca data synth``): the tasks of :mod:`distca.evals.tasks`, one conversation each.

For training they are generated on the fly from ``data.synth`` and ``trainer.seed`` and go
through the same :class:`~distca.data.chat.ChatData` as a chat file (so rendering, masks and
packing are the chat path's own); nothing needs downloading or generating first.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from distca.data.chat import ChatData
from distca.data.tokenizer import Tokenizer
from distca.evals.tasks import generate


def write_tasks(out: Path, task: str, length: int, n: int, seed: int, tokenizer: Tokenizer,
                keys: int = 1) -> int:
    """Write ``n`` examples of ``task`` (prompts of ~``length`` tokens) to ``out`` as chat JSONL,
    atomically; returns how many. A ValueError names an impossible length."""
    examples = generate(task, length, n, seed, lambda text: len(tokenizer.encode(text)),
                        keys=keys)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w") as f:
        for example in examples:
            f.write(json.dumps(example.to_chat()) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(out)
    return len(examples)


def synth_chat_data(cfg, tokenizer: Tokenizer, turns: bool) -> ChatData:
    """``data.synth`` conversations, packed like chat data (seeded by ``trainer.seed``);
    ``turns``: the batches carry turns (the GLM mask)."""
    s, d = cfg.data.synth, cfg.data
    with tempfile.TemporaryDirectory(prefix="distca-synth-") as tmp:
        path = Path(tmp) / f"{s.task}.jsonl"
        try:
            write_tasks(path, s.task, s.length, s.count, cfg.trainer.seed, tokenizer)
        except ValueError as exc:
            raise ValueError(f"data.synth: {exc}") from None
        return ChatData([str(path)], tokenizer, d.tokenizer, d.max_length, cfg.trainer.seed,
                        d.skip_bad_rows, turns=turns)
