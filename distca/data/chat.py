"""Chat data for SFT and FocuSFT: JSONL or Parquet rows with a ``messages`` list.

Each row is ``{"messages": [{"role": ..., "content": ...}, ...], "tools": [...]?}`` with roles
system, user, assistant and tool. A conversation becomes one document whose loss covers only
the assistant replies (their content and end-of-turn marker). Its *turns* (design §2) are the
maximal runs of tokens with the same loss-mask value: the system/user/tool messages together
with the assistant headers form a bidirectional context turn, each reply a causal response turn.

Rendering: a local HF tokenizer directory with a chat template (``chat_template.jinja``, or
``chat_template`` in ``tokenizer_config.json``) is rendered with it (see :class:`ChatTemplate`);
otherwise a ChatML layout
``<|im_start|>ROLE\\nCONTENT<|im_end|>\\n`` is used. Reply spans are found by rendering the
prefix up to each reply with ``add_generation_prompt=True``, so any template works without
special markers.

Masks (``attention.mask``): ``causal`` packs each conversation as one causal document (no
turns: ordinary SFT); ``glm`` adds its turns, which the planner turns into the GLM mask.

Conversations are packed whole (never cut: a cut would lose the structure the masks need),
greedily in a per-epoch order drawn from ``(seed, epoch)``; micro-batch ``g`` is a pure function
of ``g``, so resume is exact.
"""

from __future__ import annotations

import json
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np

from distca.batch import PackedBatch
from distca.data.packing import IGNORE
from distca.data.text import data_file, table_rows
from distca.data.tokenizer import Tokenizer, read_tokenizer_config, token_text

ROLES = ("system", "user", "assistant", "tool")


class ChatTemplate:
    """Renders messages to text as the tokenizer directory's chat template does, or as ChatML.

    The template is the directory's ``chat_template.jinja`` (what transformers saves), else the
    ``chat_template`` of ``tokenizer_config.json`` (the default one when it holds several).
    With transformers installed it is rendered by transformers' own ``apply_chat_template``, so
    the text matches what the model's tokenizer produces by construction; without it, by a
    sandboxed jinja2 environment set up like transformers' (trim_blocks, lstrip_blocks,
    loop controls, the special tokens as variables).
    """

    def __init__(self, tokenizer_dir: str | None):
        self._render = None
        if not tokenizer_dir:
            return
        directory = Path(tokenizer_dir)
        directory = directory if directory.is_dir() else directory.parent
        config, data = read_tokenizer_config(directory)
        jinja_file = directory / "chat_template.jinja"
        if jinja_file.is_file():
            source, where = jinja_file.read_text(), jinja_file
        else:
            source, where = data.get("chat_template"), config
            if isinstance(source, list):  # named templates: use the default one
                source = next((t["template"] for t in source if t.get("name") == "default"),
                              None)
        if source:
            jinja = _jinja_renderer(source, where, data)  # compiled here: errors name the file
            self._render = _transformers_renderer(directory, source) or jinja

    def render(self, messages: list[dict], tools: list | None, generation_prompt: bool) -> str:
        if self._render is None:
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                           for m in messages)
            return text + ("<|im_start|>assistant\n" if generation_prompt else "")
        from jinja2 import TemplateError

        try:
            return self._render(messages, tools, generation_prompt)
        except TemplateError as exc:  # a row the template cannot render: a bad row, named
            raise ValueError(f"chat template: {exc}") from None


def _transformers_renderer(directory: Path, source: str):
    """transformers' ``apply_chat_template`` for the tokenizer in ``directory``, or None when
    transformers is not installed or cannot load that directory (only tokenizer.json)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None
    tokenizer.chat_template = source  # the file's template, even where the loader differs

    def render(messages, tools, generation_prompt):
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    return render


def _raise_template_error(message: str):
    raise ValueError(f"chat template: {message}")


def _jinja_renderer(source: str, where: Path, data: dict):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_template_error
    # as transformers defines them: tojson keeps key order and does not HTML-escape
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    try:
        template = env.from_string(source)
    except TemplateError as exc:
        raise ValueError(f"{where}: chat_template: {exc}") from None
    specials = {k: token_text(data.get(k)) for k in ("bos_token", "eos_token")}

    def render(messages, tools, generation_prompt):
        return template.render(messages=messages, tools=tools,
                               add_generation_prompt=generation_prompt, **specials)
    return render


def tokenize_chat(messages: list[dict], tools: list | None, tokenizer: Tokenizer,
                  template: ChatTemplate) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (N,) int64, is_response (N,) bool): one conversation as a document."""
    pieces: list[np.ndarray] = []
    response: list[np.ndarray] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = template.render(messages[:i], tools, generation_prompt=True)
        reply = template.render(messages[: i + 1], tools, generation_prompt=False)
        if not (prompt.startswith(done) and reply.startswith(prompt)):
            raise ValueError("chat template is not prefix-stable; cannot locate replies")
        for text, is_reply in ((prompt[len(done):], False), (reply[len(prompt):], True)):
            ids = tokenizer.encode(text)
            pieces.append(ids)
            response.append(np.full(ids.size, is_reply))
        done = reply
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    return tokens.astype(np.int64), (np.concatenate(response) if response else np.zeros(0, bool))


def _check_row(row) -> tuple[list[dict], list | None]:
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        raise ValueError("row has no `messages` list")
    messages = row["messages"]
    if not messages:
        raise ValueError("`messages` is empty")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"message {j} has no valid role (one of {', '.join(ROLES)})")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {j} content is not a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message: nothing to learn from")
    tools = row.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ValueError("`tools` is not a list")
    return [{"role": m["role"], "content": m["content"]} for m in messages], tools


class ChatData:
    """Tokenized conversations packed into micro-batches with turn structure."""

    def __init__(self, paths: list[str], tokenizer: Tokenizer, tokenizer_dir: str | None,
                 max_length: int, seed: int, skip_bad_rows: bool = False,
                 turns: bool = False):
        template = ChatTemplate(tokenizer_dir)
        self.docs: list[tuple[np.ndarray, np.ndarray]] = []
        self.skipped_rows = 0
        self.too_long = 0
        for name in paths:
            path = data_file(name)
            for number, row in table_rows(path):
                try:
                    if isinstance(row, Exception):
                        raise ValueError(f"not valid UTF-8 JSON ({row})")
                    messages, tools = _check_row(row)
                    tokens, is_response = tokenize_chat(messages, tools, tokenizer, template)
                except ValueError as exc:
                    if not skip_bad_rows:
                        raise ValueError(f"{path}:{number}: bad chat row: {exc}; "
                                         f"data.skip_bad_rows=true skips such rows") from None
                    self.skipped_rows += 1
                    continue
                if tokens.size > max_length:
                    self.too_long += 1
                    continue
                self.docs.append((tokens, is_response))
        if self.too_long:
            warnings.warn(f"dropped {self.too_long} conversations longer than "
                          f"data.max_length={max_length}", stacklevel=2)
        if not self.docs:
            # say why, so an all-too-long file is not mistaken for an empty one
            raise ValueError(f"data.paths: no usable conversations in {', '.join(paths)} "
                             f"({self.too_long} longer than data.max_length={max_length}, "
                             f"{self.skipped_rows} bad rows skipped)")
        self.seed = seed
        self.turns = turns  # the GLM mask: hand the planner each conversation's turns
        self._bins: dict[int, list[list[int]]] = {}
        self._bin_total = -1

    def _epoch_bins(self, epoch: int, total: int) -> list[list[int]]:
        if total != self._bin_total:
            self._bins, self._bin_total = {}, total
        if epoch not in self._bins:
            longest = max(d[0].size for d in self.docs)
            if longest > total:
                raise ValueError(f"a conversation of {longest} tokens is longer than a "
                                 f"micro-batch ({total} tokens, parallel.dp x "
                                 f"data.tokens_per_rank): raise data.tokens_per_rank or lower "
                                 f"data.max_length")
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.docs))
            bins: list[list[int]] = [[]]
            used = 0
            for doc in order.tolist():
                n = self.docs[doc][0].size
                if used + n > total:
                    bins.append([])
                    used = 0
                bins[-1].append(doc)
                used += n
            self._bins[epoch] = bins
        return self._bins[epoch]

    def micro_batch(self, index: int, num_ranks: int, tokens_per_rank: int) -> PackedBatch:
        total = num_ranks * tokens_per_rank
        per_epoch = len(self._epoch_bins(0, total))
        epoch, k = divmod(index, per_epoch)
        chosen = [self.docs[d] for d in self._epoch_bins(epoch, total)[k]]
        return pack_conversations(chosen, num_ranks, tokens_per_rank, self.turns)


def pack_conversations(docs: list[tuple[np.ndarray, np.ndarray]], num_ranks: int,
                       tokens_per_rank: int, turns: bool = True) -> PackedBatch:
    """Lay conversations back to back; labels only where the next token is a reply token.

    ``turns``: give the batch the conversations' turns (the GLM mask); without them each
    conversation is one causal document."""
    total = num_ranks * tokens_per_rank
    tokens = np.zeros(total, np.int64)
    labels = np.full(total, IGNORE, np.int64)
    turn_lengths: list[int] = []
    turn_is_context: list[bool] = []
    at = 0
    for ids, is_response in docs:
        n = ids.size
        tokens[at:at + n] = ids
        # position t predicts token t+1 of the same conversation when that token is a reply
        learn = is_response[1:]
        labels[at:at + n - 1] = np.where(learn, ids[1:], IGNORE)
        # turns: maximal runs of tokens with the same loss-mask value (reply or not)
        mask = is_response
        cuts = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
        bounds = np.concatenate([[0], cuts, [n]])
        turn_lengths += np.diff(bounds).tolist()
        turn_is_context += [not bool(mask[b]) for b in bounds[:-1]]
        at += n
    return PackedBatch(tokens=tokens, labels=labels,
                       doc_lengths=np.asarray([d[0].size for d in docs], np.int64),
                       tokens_per_rank=tokens_per_rank,
                       turn_lengths=np.asarray(turn_lengths, np.int64) if turns else None,
                       turn_is_context=np.asarray(turn_is_context, bool) if turns else None)
