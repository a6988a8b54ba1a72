"""``distca eval CKPT --task niah|vt|cwe --length N --n K``: greedy answers, JSON accuracy.

Each synthetic example (:mod:`distca.evals.tasks`) is rendered as a chat prompt (system + user
turn, generation prompt) with the tokenizer's chat template, answered by greedy decoding with
our model in this one process, and scored by RULER's match-all rule. Prints one JSON object on
stdout: ``{"task", "length", "n", "seed", "accuracy", "scores", "checkpoint"}``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from distca.errors import UsageError
from distca.evals.tasks import TASKS

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


def greedy_reply(logits_fn: Callable, prompt, max_new_tokens: int, decoder: Decoder) -> str:
    """Greedy continuation of ``prompt`` (int64 ids) until the stop token/text or the limit.

    ``logits_fn(ids (S,)) -> (S, vocab)``; the whole sequence is re-run per token (no KV cache:
    evaluation here is about correctness at long context, not decoding speed).
    """
    import torch

    ids = torch.as_tensor(prompt, dtype=torch.int64)
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits_fn(ids)[-1].argmax())
        if token == decoder.stop_id:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([token])])
        if decoder.stop_text and decoder.decode(new).endswith(decoder.stop_text):
            break
    text = decoder.decode(new)
    return text[:-len(decoder.stop_text)] if decoder.stop_text and text.endswith(
        decoder.stop_text) else text


def evaluate(examples, answer: Callable[[dict], str]) -> dict:
    """Accuracy (mean match-all score) of ``answer(chat_row) -> reply`` over ``examples``."""
    from distca.evals.tasks import score

    scores = [score(e.answers, answer(e.to_chat())) for e in examples]
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

    def answer(row: dict) -> str:
        prompt = template.render(row["messages"][:-1], None, generation_prompt=True)
        return greedy_reply(model.logits, tokenizer.encode(prompt), args.max_new_tokens, decoder)

    result = evaluate(examples, answer)
    print(json.dumps({"task": args.task, "length": args.length, "seed": args.seed,
                      "checkpoint": str(args.ckpt), **result}))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="synthetic long-context accuracy of a checkpoint (JSON)")
    p.add_argument("ckpt", help="a run directory (its latest checkpoint) or a step directory")
    p.add_argument("--task", required=True, choices=TASKS,
                   help="niah: find hidden numbers; vt: follow variable assignments; cwe: "
                        "name the most common words")
    p.add_argument("--length", type=int, required=True, help="target prompt tokens")
    p.add_argument("--n", type=int, required=True, help="number of examples")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated examples (0)")
    p.add_argument("--tokenizer", default=None,
                   help="local HF tokenizer directory (default: the checkpoint's data.tokenizer, "
                        "else built-in byte-level)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="reply length limit")
    p.set_defaults(run=run)
