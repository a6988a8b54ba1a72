import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from distca.config import load_config
from distca.data.chat import ChatData, ChatTemplate, pack_conversations, tokenize_chat
from distca.data.dataset import make_dataset
from distca.data.packing import IGNORE
from distca.data.tokenizer import ByteTokenizer, HFTokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Count to two"},
    {"role": "tool", "content": "{}"},
    {"role": "assistant", "content": "1 2"},
]


def decode_bytes(ids):
    return bytes(int(i) for i in ids).decode()


def test_chatml_loss_only_on_replies():
    tokens, is_response = tokenize_chat(CONVERSATION, None, ByteTokenizer(), ChatTemplate(None))
    text = decode_bytes(tokens)
    assert text.count("<|im_start|>") == 6
    replies = decode_bytes(tokens[is_response])
    assert replies == "Hello!<|im_end|>\n1 2<|im_end|>\n"


def test_packing_labels_and_turns_follow_the_loss_mask():
    doc = tokenize_chat(CONVERSATION, None, ByteTokenizer(), ChatTemplate(None))
    short = tokenize_chat(CONVERSATION[1:3], None, ByteTokenizer(), ChatTemplate(None))
    n = doc[0].size + short[0].size
    batch = pack_conversations([doc, short], num_ranks=2, tokens_per_rank=(n + 9) // 2)
    assert batch.doc_lengths.tolist() == [doc[0].size, short[0].size]
    is_resp = np.concatenate([doc[1], short[1]])
    starts = {0, doc[0].size}
    for t in range(n):
        expected = batch.tokens[t + 1] if t + 1 < n and is_resp[t + 1] and t + 1 not in starts \
            else IGNORE
        assert batch.labels[t] == expected
    assert (batch.labels[n:] == IGNORE).all()
    # turns: context, reply, context, reply for the first conversation; context, reply after
    assert batch.turn_is_context.tolist() == [True, False, True, False, True, False]
    ends = np.cumsum(batch.turn_lengths)
    for end, is_ctx in zip(ends, batch.turn_is_context):
        assert is_resp[end - 1] == (not is_ctx)


def write_tokenizer_dir(tmp_path):
    vocab = {ch: i for i, ch in enumerate(sorted(set("".join(chr(c) for c in range(32, 127)))))}
    vocab["[UNK]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(tmp_path / "tokenizer.json"))
    template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}"
                "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "eos_token": "$"}))
    return tmp_path


def test_hf_chat_template_reply_spans(tmp_path):
    directory = write_tokenizer_dir(tmp_path)
    tokenizer = HFTokenizer(directory)
    tokens, is_response = tokenize_chat(CONVERSATION[:3], None, tokenizer,
                                        ChatTemplate(str(directory)))
    inverse = {v: k for k, v in tokenizer._tok.get_vocab().items()}
    text = "".join(inverse[int(t)] for t in tokens)
    assert text == "[system]Be brief.$[user]Hi$[assistant]Hello!$"
    assert "".join(inverse[int(t)] for t in tokens[is_response]) == "Hello!$"


def test_tokenizer_given_as_its_file_keeps_its_chat_template(tmp_path):
    """data.tokenizer may name tokenizer.json itself; the template beside it used to be
    ignored (ChatML instead, silently) and eval's decoder crashed on such a path."""
    from distca.commands.eval import Decoder

    file = str(write_tokenizer_dir(tmp_path) / "tokenizer.json")
    rendered = ChatTemplate(file).render(CONVERSATION[:3], None, generation_prompt=False)
    assert rendered == "[system]Be brief.$[user]Hi$[assistant]Hello!$"
    decoder = Decoder(file)
    assert decoder.stop_id == HFTokenizer(file).token_id("$")
    assert decoder.decode(HFTokenizer(file).encode("Hi!").tolist()).replace(" ", "") == "Hi!"


def test_template_errors_name_the_config_or_the_row(tmp_path):
    """A broken tokenizer_config.json or template, and a row the template cannot render, used
    to surface as bare JSON/jinja exceptions naming neither file nor row."""
    (tmp_path / "tok").mkdir()
    directory = write_tokenizer_dir(tmp_path / "tok")
    config = directory / "tokenizer_config.json"
    data = tmp_path / "chat.jsonl"
    write_rows(data, [{"messages": CONVERSATION[1:3]}])

    def load():
        return ChatData([str(data)], HFTokenizer(directory), str(directory), 4096, seed=0)

    config.write_text("{not json")
    with pytest.raises(ValueError, match=rf"{config}: not valid JSON"):
        load()
    config.write_text(json.dumps({"chat_template": "{% for m in messages %}"}))
    with pytest.raises(ValueError, match=rf"{config}: chat_template"):
        load()
    config.write_text(json.dumps({"chat_template": "{{ messages[0].tool_calls.name }}"}))
    with pytest.raises(ValueError, match=rf"{data}:1: bad chat row: chat template"):
        load()


def write_rows(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_malformed_rows_name_file_and_row(tmp_path):
    good = {"messages": CONVERSATION}
    path = tmp_path / "chat.jsonl"
    for bad in ["{not json", {"messages": []}, {"messages": [{"role": "pirate", "content": "x"}]},
                {"messages": [{"role": "user", "content": "only a question"}]},
                {"messages": [{"role": "user", "content": 3}]}]:
        write_rows(path, [good, bad])
        with pytest.raises(ValueError, match=rf"{path}:2: bad chat row"):
            ChatData([str(path)], ByteTokenizer(), None, 4096, seed=0)
    data = ChatData([str(path)], ByteTokenizer(), None, 4096, seed=0, skip_bad_rows=True)
    assert data.skipped_rows == 1 and len(data.docs) == 1
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        ChatData([str(tmp_path / "missing.jsonl")], ByteTokenizer(), None, 4096, seed=0)


def test_undecodable_line_is_a_bad_row_and_a_bom_is_accepted(tmp_path):
    path = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": CONVERSATION}).encode()
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + good.replace(b"Hi", b"H\xff") + b"\n")
    with pytest.raises(ValueError, match=rf"{path}:2: bad chat row: not valid UTF-8"):
        ChatData([str(path)], ByteTokenizer(), None, 4096, seed=0)
    data = ChatData([str(path)], ByteTokenizer(), None, 4096, seed=0, skip_bad_rows=True)
    assert data.skipped_rows == 1 and len(data.docs) == 1


def test_all_conversations_too_long_says_so(tmp_path):
    """The error itself says why nothing is left (the warning may be lost in worker logs)."""
    path = tmp_path / "chat.jsonl"
    write_rows(path, [{"messages": CONVERSATION}] * 2)
    with pytest.warns(UserWarning), pytest.raises(
            ValueError, match=r"no usable conversations .*2 longer than data.max_length=10"):
        ChatData([str(path)], ByteTokenizer(), None, 10, seed=0)


def test_parquet_rows_and_deterministic_epochs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": CONVERSATION[1:3]}] * 3 + [{"messages": CONVERSATION}] * 2
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    data = ChatData([str(tmp_path / "chat.parquet")], ByteTokenizer(), None, 4096, seed=5)
    assert len(data.docs) == 5
    a = [data.micro_batch(i, 2, 128) for i in range(6)]
    b = [data.micro_batch(i, 2, 128) for i in range(6)]
    for x, y in zip(a, b):
        assert np.array_equal(x.tokens, y.tokens) and np.array_equal(x.labels, y.labels)
    per_epoch = len(data._epoch_bins(0, 256))
    docs_in_epoch = sum(a[i].doc_lengths.size for i in range(per_epoch))
    assert docs_in_epoch == 5  # every conversation once per epoch, none cut


def test_skipped_rows_reach_the_dataset_the_trainer_logs(tmp_path):
    path = tmp_path / "chat.jsonl"
    write_rows(path, [{"messages": CONVERSATION}, "{not json", {"messages": CONVERSATION}])
    cfg = load_config(Path(__file__).parents[2] / "recipes" / "tiny-focusft.yaml",
                      ["data.kind=chat", f"data.paths=[{path}]", "data.skip_bad_rows=true"])
    assert make_dataset(cfg).skipped_rows == 1


def test_conversation_longer_than_a_micro_batch_fails_before_training(tmp_path, capsys):
    """It used to pass make_dataset and fail with a traceback in the first step, after Ray
    had started the workers."""
    from distca.cli import main

    path = tmp_path / "chat.jsonl"
    write_rows(path, [{"messages": CONVERSATION}])  # about 190 byte tokens
    recipe = Path(__file__).parents[2] / "recipes" / "tiny-focusft.yaml"
    overrides = ["data.kind=chat", f"data.paths=[{path}]", "data.tokens_per_rank=64",
                 f"trainer.run_dir={tmp_path / 'run'}"]
    with pytest.raises(ValueError, match=r"conversation of \d+ tokens .* \(128 tokens"):
        make_dataset(load_config(recipe, overrides))
    assert main(["train", str(recipe), *overrides]) == 2
    assert "data.tokens_per_rank" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# a Qwen-like template: whitespace control, loop variables, tools, the special tokens
QWEN_LIKE = (
    "{{ bos_token }}{%- if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>"
    "{%- endif %}\n{%- for m in messages %}\n    {%- if m.role == 'assistant' %}"
    "<a>{{ m.content | trim }}{{ eos_token }}\n    {%- else %}<{{ m.role }}>{{ m.content }}"
    "{% if loop.last %}!{% endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}<a>{% endif %}")


def test_chat_template_jinja_renders_exactly_as_transformers(tmp_path, monkeypatch):
    """A tokenizer saved by transformers keeps its template in chat_template.jinja; it used to
    be ignored (the config's template, or ChatML). Rendering goes through transformers'
    apply_chat_template when installed, and the jinja2 fallback renders the same text."""
    transformers = pytest.importorskip("transformers")
    import sys

    directory = write_tokenizer_dir(tmp_path)
    saved = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(directory / "tokenizer.json"), bos_token="^", eos_token="$")
    saved.chat_template = QWEN_LIKE
    saved.save_pretrained(str(directory))
    assert (directory / "chat_template.jinja").read_text() == QWEN_LIKE
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ 'an older template the .jinja file replaces' }}"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    tools = [{"type": "function", "function": {"name": "count", "parameters": {"n": "<int>"}}}]
    cases = [(CONVERSATION[:3], None, False), (CONVERSATION[:5], tools, True),
             (CONVERSATION, None, False)]
    expected = [hf.apply_chat_template(m, tools=t, tokenize=False, add_generation_prompt=g)
                for m, t, g in cases]
    assert expected[0].startswith("^<system>Be brief.<user>Hi<a>Hello!$")
    ours = ChatTemplate(str(directory))
    assert [ours.render(m, t, g) for m, t, g in cases] == expected
    monkeypatch.setitem(sys.modules, "transformers", None)  # not installed: jinja2 renders
    fallback = ChatTemplate(str(directory))
    assert [fallback.render(m, t, g) for m, t, g in cases] == expected


@pytest.mark.parametrize("mask, turns", [("causal", False), ("glm", True)])
def test_attention_mask_decides_whether_batches_carry_turns(tmp_path, mask, turns):
    """causal: each conversation one causal document (no turns for the planner); glm: turns."""
    path = tmp_path / "chat.jsonl"
    write_rows(path, [{"messages": CONVERSATION}])
    cfg = load_config(Path(__file__).parents[2] / "recipes" / "tiny-focusft.yaml",
                      ["data.kind=chat", f"data.paths=[{path}]", f"attention.mask={mask}"])
    batch = make_dataset(cfg).step_batches(1)[0]
    assert (batch.turn_lengths is not None) == turns
    assert (batch.labels != IGNORE).sum() == len("Hello!<|im_end|>\n1 2<|im_end|>\n")
