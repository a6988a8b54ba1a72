"""Data: length distributions, synthetic documents, text files, tokenizers, packing."""

import json

import numpy as np
import pytest

from distca.config import load_config
from distca.data import (
    ByteTokenizer,
    HFTokenizer,
    LengthSampler,
    SyntheticData,
    TextData,
    make_dataset,
    pack,
    read_documents,
    read_lengths_file,
)


def check_batch(batch, num_ranks, tokens_per_rank):
    n = num_ranks * tokens_per_rank
    assert batch.tokens.shape == (n,) and batch.tokens.dtype == np.int64
    assert batch.num_ranks == num_ranks
    used = int(batch.doc_lengths.sum())
    # labels are the next token of the same document; last token of a document and padding: -100
    ends = set((np.cumsum(batch.doc_lengths) - 1).tolist())
    for i in range(n):
        if i >= used or i in ends:
            assert batch.labels[i] == -100
        else:
            assert batch.labels[i] == batch.tokens[i + 1]


@pytest.mark.parametrize("dist", ["pretrain", "prolong"])
def test_length_distributions_are_long_tailed_and_bounded(dist):
    rng = np.random.default_rng(0)
    lengths = LengthSampler(dist, 8192).sample(rng, 20000)
    assert lengths.min() >= 1 and lengths.max() <= 8192
    # long tail: the median document is short, but long documents hold much of the tokens
    assert np.median(lengths) < 8192 / 4
    assert lengths[lengths >= 8192 / 4].sum() > 0.3 * lengths.sum()


def test_fill_sums_exactly_to_budget():
    sampler = LengthSampler("pretrain", 2048)
    for seed in range(50):
        lengths = sampler.fill(np.random.default_rng(seed), 3000)
        assert lengths.sum() == 3000 and lengths.min() >= 1


def test_lengths_file_formats_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("5\n7\n\n9\n")
    (tmp_path / "b.json").write_text("[3, 4]")
    (tmp_path / "bad.txt").write_text("5\nseven\n")
    (tmp_path / "zero.txt").write_text("0\n")
    assert read_lengths_file(tmp_path / "a.txt").tolist() == [5, 7, 9]
    assert read_lengths_file(tmp_path / "b.json").tolist() == [3, 4]
    with pytest.raises(ValueError, match="bad.txt.*'seven'"):
        read_lengths_file(tmp_path / "bad.txt")
    with pytest.raises(ValueError, match="zero.txt.*0"):
        read_lengths_file(tmp_path / "zero.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        LengthSampler(str(tmp_path / "missing.txt"), 100)
    drawn = LengthSampler(str(tmp_path / "a.txt"), 8).sample(np.random.default_rng(0), 100)
    assert set(drawn.tolist()) <= {5, 7, 8}


def test_synthetic_batches_are_deterministic_valid_and_learnable():
    data = SyntheticData("pretrain", 512, vocab_size=97, seed=3)
    a = data.micro_batch(5, 2, 256)
    b = SyntheticData("pretrain", 512, vocab_size=97, seed=3).micro_batch(5, 2, 256)
    c = data.micro_batch(6, 2, 256)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.doc_lengths, b.doc_lengths)
    assert not np.array_equal(a.tokens, c.tokens)
    assert a.doc_lengths.sum() == 512 and a.tokens.min() >= 0 and a.tokens.max() < 97
    check_batch(a, 2, 256)
    # every within-document step is stride * step with stride in {1,2,3} and step in 1..8
    valid = a.labels != -100
    deltas = (a.labels[valid] - a.tokens[valid]) % 97
    assert set(deltas.tolist()) <= {s * k for s in (1, 2, 3) for k in range(1, 9)}


def test_pack_handles_one_token_documents_and_padding():
    docs = [np.array([5]), np.array([1, 2, 3]), np.array([], dtype=np.int64), np.array([9, 8])]
    batch = pack(docs, 2, 4)
    assert batch.doc_lengths.tolist() == [1, 3, 2]
    assert batch.tokens.tolist() == [5, 1, 2, 3, 9, 8, 0, 0]
    assert batch.labels.tolist() == [-100, 2, 3, -100, 8, -100, -100, -100]
    assert batch.position_ids().tolist() == [0, 0, 1, 2, 0, 1, 0, 0]
    with pytest.raises(ValueError, match="do not fit"):
        pack([np.arange(9)], 2, 4)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_text_stream_covers_every_token_once_per_epoch(tmp_path):
    texts = ["hello world", "a", "the quick brown fox jumps over the lazy dog" * 3, "xyz"]
    write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    (tmp_path / "plain.txt").write_text("plain text file")
    data = TextData([str(tmp_path / "d.jsonl"), str(tmp_path / "plain.txt")], ByteTokenizer(),
                    max_length=40, seed=1)
    total = data.num_tokens
    assert total == sum(len(t) for t in texts) + len("plain text file")
    assert data.doc_lengths.max() <= 40
    epoch = []
    index = 0
    while sum(b.doc_lengths.sum() for b in epoch) < total:
        batch = data.micro_batch(index, 2, 8)
        check_batch(batch, 2, 8)
        assert batch.doc_lengths.sum() == 16  # text batches are always full
        epoch.append(batch)
        index += 1
    stream = np.concatenate([b.tokens for b in epoch])[:total]
    # the first epoch is a permutation of the documents: the same multiset of tokens
    assert np.array_equal(np.sort(stream), np.sort(data.tokens))
    again = TextData([str(tmp_path / "d.jsonl"), str(tmp_path / "plain.txt")], ByteTokenizer(),
                     max_length=40, seed=1).micro_batch(3, 2, 8)
    assert np.array_equal(again.tokens, data.micro_batch(3, 2, 8).tokens)


def test_text_errors_name_file_and_line(tmp_path):
    write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "{not json", {"body": "x"}])
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_documents([str(tmp_path / "nope.jsonl")])
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_documents([str(tmp_path / "bad.jsonl")])
    with pytest.warns(UserWarning, match="skipped 2 bad rows"):
        assert read_documents([str(tmp_path / "bad.jsonl")], skip_bad_rows=True) == (["ok"], 2)


def test_text_jsonl_bytes_bom_and_directories(tmp_path):
    """A stray non-UTF-8 byte is a bad row named by line (it used to abort with a bare
    UnicodeDecodeError); a leading BOM is accepted; a directory is named as one."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "ok"}\n{"text": "\xff"}\n{"text": "fine"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: bad row \(not valid UTF-8"):
        read_documents([str(path)])
    with pytest.warns(UserWarning, match="skipped 1 bad rows"):
        assert read_documents([str(path)], skip_bad_rows=True) == (["ok", "fine"], 1)
    with pytest.raises(FileNotFoundError, match="is a directory"):
        read_documents([str(tmp_path)])


def test_text_reads_parquet_and_refuses_binary_files(tmp_path):
    """A .parquet or .jsonl.gz file used to be read as plain text: training on its bytes."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": "bb"}]), tmp_path / "d.parquet")
    assert read_documents([str(tmp_path / "d.parquet")]) == (["a", "bb"], 0)
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write('{"text": "hello"}\n' * 50)
    with pytest.raises(ValueError, match=r"d.jsonl.gz is not a text file"):
        read_documents([str(tmp_path / "d.jsonl.gz")])


def test_hf_tokenizer_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the cat sat on the mat"] * 3,
                            trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(tmp_path)
    ids = hf.encode("the cat sat")
    assert ids.dtype == np.int64 and ids.size == 3 and len(set(ids.tolist())) == 3
    assert hf.vocab_size == 6
    with pytest.raises(FileNotFoundError, match="nowhere"):
        HFTokenizer(tmp_path / "nowhere")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="broken"):
        HFTokenizer(tmp_path / "broken")


def test_make_dataset_from_recipe(tmp_path):
    cfg = load_config("recipes/tiny.yaml", ["data.micro_batches=2"])
    data = make_dataset(cfg)
    batches = data.step_batches(1)
    assert len(batches) == 2
    assert batches[0].tokens.size == cfg.parallel.dp * cfg.data.tokens_per_rank
    assert not np.array_equal(batches[0].tokens, data.step_batches(2)[0].tokens)
    write_jsonl(tmp_path / "t.jsonl", [{"text": "some text " * 50}])
    cfg = load_config("recipes/tiny.yaml", ["data.kind=text", f"data.paths=[{tmp_path}/t.jsonl]",
                                            "data.tokens_per_rank=64"])
    assert make_dataset(cfg).step_batches(1)[0].tokens.max() < 256
    cfg = load_config("recipes/tiny.yaml", ["data.kind=text", f"data.paths=[{tmp_path}/t.jsonl]",
                                            "model.vocab_size=100"])
    with pytest.raises(ValueError, match="model.vocab_size=100"):
        make_dataset(cfg)


def test_text_documents_get_the_tokenizers_bos_and_eos(tmp_path):
    """Pretraining text used to be concatenated with no document markers at all."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "cat": 3, "dog": 4, "sat": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    write_jsonl(tmp_path / "d.jsonl", [{"text": "cat sat"}, {"text": "dog"}])
    data = TextData([str(tmp_path / "d.jsonl")], HFTokenizer(tmp_path), max_length=64, seed=0)
    assert data.doc_lengths.tolist() == [4, 3]
    assert data.tokens.tolist() == [0, 3, 5, 1, 0, 4, 1]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    data = TextData([str(tmp_path / "d.jsonl")], HFTokenizer(tmp_path), max_length=64, seed=0)
    assert data.tokens.tolist() == [3, 5, 1, 4, 1]  # no BOS in the tokenizer: EOS only


def test_data_paths_take_a_file_a_directory_or_a_glob(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "notes.md"):
        write_jsonl(tmp_path / name, [{"text": f"text of {name} " * 20}])

    def files(paths):
        cfg = load_config("recipes/tiny.yaml", ["data.kind=text", f"data.paths={paths}",
                                                "data.tokens_per_rank=64"])
        return sorted(make_dataset(cfg).source.doc_lengths.tolist()), cfg.data.paths

    one = files(tmp_path / "a.jsonl")  # a single path is a list of one
    assert one[1] == [str(tmp_path / "a.jsonl")]
    both = files(tmp_path)  # a directory: its data files (not notes.md)
    assert both[0] == files(tmp_path / "*.jsonl")[0] and len(both[0]) == 2
    with pytest.raises(FileNotFoundError, match=r"data.paths: .*\*.parquet matches no file"):
        files(tmp_path / "*.parquet")
