"""``distca eval CKPT --task niah|vt|cwe --length N --n K``: greedy answers, JSON accuracy.

Each synthetic example (:mod:`distca.evals.tasks`, held out by default: its ``--seed`` default
differs from ``distca data synth``'s) is rendered as a chat prompt (system + user turn,
generation prompt) with the tokenizer's chat template at a length counted in that tokenizer's
tokens, answered by greedy decoding with a KV cache with our model in this one process, and
scored by RULER's match-all rule. ``--mask glm`` attends to the prompt as one bidirectional
context turn (FocuSFT's training mask); the default ``causal`` is how a stripped FocuSFT
checkpoint runs anywhere else.

Prints one JSON object on stdout: ``{"task", "length", "mask", "n", "seed", "accuracy",
"scores", "checkpoint"}``; ``--attention-stats`` adds ``attention_stats``: the statistics of
:mod:`distca.attention.telemetry` of a teacher-forced forward over prompt + reference answer
with the same mask (``first_token_mass``, ``context_mass``, ``sink_rate``, ``sink_mass`` with
learnable sinks, ``per_layer`` lists, means over examples' loss-bearing rows, heads and
layers), ``reply_loss`` (the same forward's mean cross entropy over all reference-answer
tokens) and ``examples``: each one's ``input_ids`` and the ``rows`` [start, end) averaged.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator

from distca.errors import UsageError
from distca.evals.tasks import EVAL_SEED, TASKS

CHATML_END = "<|im_end|>"


class Decoder:
    """Token ids -> text for the evaluation's tokenizer, and where a reply ends."""

    def __init__(self, tokenizer_dir: str | None):
        self.stop_id: int | None = None
        self.stop_text: str | None = None
        if tokenizer_dir is None:
            self._tok = None
            self.stop_text = CHATML_END
            return
        from distca.data.tokenizer import HFTokenizer, read_tokenizer_config, token_text

        self._tok = HFTokenizer(tokenizer_dir)
        eos = token_text(read_tokenizer_config(tokenizer_dir)[1].get("eos_token"))
        self.stop_id = self._tok.token_id(eos) if eos else None
        if self.stop_id is None:
            self.stop_text = CHATML_END

    def decode(self, ids: list[int]) -> str:
        if self._tok is None:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return self._tok.decode(ids)


def greedy_reply(tokens: Iterator[int], max_new_tokens: int, decoder: Decoder) -> str:
    """The reply text of the greedy ``tokens`` (e.g. :meth:`LocalModel.greedy`), cut at the
    stop token/text or after ``max_new_tokens``."""
    new: list[int] = []
    for token, _ in zip(tokens, range(max_new_tokens)):
        if token == decoder.stop_id:
            break
        new.append(token)
        if decoder.stop_text and decoder.decode(new).endswith(decoder.stop_text):
            break
    text = decoder.decode(new)
    return text[:-len(decoder.stop_text)] if decoder.stop_text and text.endswith(
        decoder.stop_text) else text


def evaluate(examples, answer: Callable[[dict], str]) -> dict:
    """Accuracy (mean match-all score) of ``answer(chat_row) -> reply`` over ``examples``."""
    from tqdm import tqdm

    from distca.evals.tasks import score

    scores = [score(e.answers, answer(e.to_chat()))
              for e in tqdm(examples, desc="eval", unit="example", file=sys.stderr)]
    return {"n": len(scores), "accuracy": sum(scores) / len(scores), "scores": scores}


def run(args: argparse.Namespace) -> int:
    from distca.data.chat import ChatTemplate
    from distca.data.tokenizer import load_tokenizer
    from distca.evals.tasks import generate
    from distca.hf.config_map import HFFormatError
    from distca.hf.io import read_checkpoint
    from distca.hf.local import LocalModel, single_rank_config

    if args.length < 1 or args.n < 1 or args.max_new_tokens < 1:
        raise UsageError(f"--length, --n and --max-new-tokens must be >= 1 "
                         f"(got {args.length}, {args.n}, {args.max_new_tokens})")
    try:
        cfg, state, _ = read_checkpoint(args.ckpt)
    except HFFormatError as exc:
        raise UsageError(str(exc)) from exc
    if args.length > cfg.model.max_position_embeddings:  # and its memory grows with it
        raise UsageError(f"--length {args.length}: more than the model's "
                         f"max_position_embeddings={cfg.model.max_position_embeddings}")
    tokenizer_dir = args.tokenizer or cfg.data.tokenizer
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
        decoder = Decoder(tokenizer_dir)
        template = ChatTemplate(tokenizer_dir)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--tokenizer {tokenizer_dir}: {exc}") from exc
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UsageError(f"--tokenizer {tokenizer_dir or 'byte'}: vocabulary of "
                         f"{tokenizer.vocab_size} exceeds the model's {cfg.model.vocab_size}")
    try:
        examples = generate(args.task, args.length, args.n, args.seed,
                            lambda text: len(tokenizer.encode(text)))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc

    model = LocalModel(single_rank_config(cfg.model, cfg.attention.backend.value))
    model.load_model_state(state)

    glm = args.mask == "glm"

    def answer(row: dict) -> str:
        prompt = template.render(row["messages"][:-1], None, generation_prompt=True)
        return greedy_reply(model.greedy(tokenizer.encode(prompt), bidirectional_prompt=glm),
                            args.max_new_tokens, decoder)

    result = {"task": args.task, "length": args.length, "mask": args.mask, "seed": args.seed,
              "checkpoint": str(args.ckpt), **evaluate(examples, answer)}
    if args.attention_stats:
        result["attention_stats"] = teacher_forced_stats(model, examples, tokenizer, template,
                                                         glm)
    print(json.dumps(result))
    return 0


def teacher_forced_stats(model, examples, tokenizer, template, glm: bool) -> dict:
    """``attention_stats`` (module docstring) of ``examples`` with their reference answers,
    packed exactly as training packs chat data (:func:`pack_conversations`)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from distca.attention import AttentionStats, RowSpec
    from distca.data.chat import pack_conversations, tokenize_chat
    from distca.data.packing import IGNORE

    m = model.cfg.model
    stats = AttentionStats(m.num_layers, m.num_attention_heads, has_sinks=m.learnable_sinks)
    shown, loss_sum, loss_tokens = [], 0.0, 0
    for example in examples:
        ids, is_response = tokenize_chat(example.to_chat()["messages"], None, tokenizer,
                                         template)
        batch = pack_conversations([(ids, is_response)], 1, ids.size, turns=glm)
        has_label = batch.labels != IGNORE
        rows = RowSpec.from_documents(batch.doc_lengths, has_label, chat=True)
        turns = (list(zip(batch.turn_lengths.tolist(), batch.turn_is_context.tolist()))
                 if glm else None)
        logits = model.attention_stats(stats, batch.tokens, rows, turns)
        counted = np.flatnonzero(has_label)  # one reply: a contiguous range of rows
        loss_sum += float(F.cross_entropy(logits[counted], torch.as_tensor(
            batch.labels[counted], dtype=torch.int64), reduction="sum"))
        loss_tokens += counted.size
        shown.append({"input_ids": ids.tolist(),
                      "rows": [int(counted[0]), int(counted[-1]) + 1]})
    return {**stats.summary(), "reply_loss": loss_sum / max(loss_tokens, 1), "examples": shown}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="synthetic long-context accuracy of a checkpoint (JSON)")
    p.add_argument("ckpt", help="a run directory (its latest checkpoint) or a step directory")
    p.add_argument("--task", required=True, choices=TASKS,
                   help="niah: find hidden numbers; vt: follow variable assignments; cwe: "
                        "name the most common words")
    p.add_argument("--length", type=int, required=True, help="target prompt tokens")
    p.add_argument("--n", type=int, required=True, help="number of examples")
    p.add_argument("--seed", type=int, default=EVAL_SEED,
                   help=f"example seed (default {EVAL_SEED}: held out from `distca data synth`'s "
                        f"default)")
    p.add_argument("--mask", choices=("causal", "glm"), default="causal",
                   help="causal (default: how the model runs anywhere) or glm (FocuSFT's "
                        "training mask: the prompt one bidirectional context turn)")
    p.add_argument("--attention-stats", action="store_true",
                   help="add attention_stats (first-token and context mass, sink rate) of a "
                        "teacher-forced forward over prompt + reference answer")
    p.add_argument("--tokenizer", default=None,
                   help="local HF tokenizer directory (default: the checkpoint's data.tokenizer, "
                        "else built-in byte-level)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="reply length limit")
    p.set_defaults(run=run)
