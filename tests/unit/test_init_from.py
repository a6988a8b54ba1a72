"""``model.init_from``: the shape comes from the source (a Hugging Face directory, sharded or
not, a GGUF file, a distca run), explicit keys that disagree and bad sources exit 2 naming
them, and a rank loads its shard of the source's weights (fp32 masters from the source even in
bf16)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from distca.cli import main  # noqa: E402
from distca.config import DistBackend, ModelConfig, load_config  # noqa: E402
from distca.hf import hf_config_from_model, megatron_from_hf  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_process_group")

TINY = "recipes/tiny.yaml"
M = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                ffn_hidden_size=96, vocab_size=128, rope_theta=5000.0, norm_eps=1e-6)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random Llama written by transformers as sharded safetensors (with its index)."""
    path = tmp_path_factory.mktemp("hf")
    config = transformers.AutoConfig.for_model(**{
        k: v for k, v in hf_config_from_model(M).items() if k != "architectures"})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def test_shape_comes_from_the_source_and_replaces_the_preset(hf_dir, capsys):
    cfg = load_config(TINY, [f"model.init_from={hf_dir}", "model.max_position_embeddings=16384"])
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_kv_heads,
            m.ffn_hidden_size, m.vocab_size, m.rope_theta) == (2, 64, 4, 2, 96, 128, 5000.0)
    assert m.preset is None and m.max_position_embeddings == 16384  # a longer context is free
    assert "model.preset=tiny is not used" in capsys.readouterr().err
    assert cfg.data.tokenizer is None  # the source has no tokenizer.json


@pytest.mark.parametrize("override, key", [
    ("model.num_layers=3", "model.num_layers"),
    ("model.qkv_bias=true", "model.qkv_bias"),
    ("model.learnable_sinks=true", "model.learnable_sinks"),
])
def test_explicit_key_disagreeing_with_the_source_exits_2(hf_dir, override, key, capsys):
    assert main(["config", "show", TINY, f"model.init_from={hf_dir}", override]) == 2
    err = capsys.readouterr().err
    assert f"{key}:" in err and "disagrees" in err


def test_agreeing_explicit_key_is_accepted(hf_dir):
    assert load_config(TINY, [f"model.init_from={hf_dir}", "model.num_layers=2"]).model \
        .num_layers == 2


def test_bad_sources_exit_2_before_ray_naming_them(hf_dir, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    config = json.loads((hf_dir / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    for source, words in [(tmp_path / "notes.txt", "not a Hugging Face model directory"),
                          (tmp_path / "missing", "no such file"),
                          (gpt2, "architectures: 'GPT2LMHeadModel' is not supported")]:
        assert main(["train", TINY, f"model.init_from={source}"]) == 2
        err = capsys.readouterr().err
        assert "model.init_from" in err and words in err, err


def test_tokenizer_comes_from_the_source_unless_given(hf_dir, tmp_path):
    src = tmp_path / "with_tok"
    src.mkdir()
    for f in hf_dir.iterdir():
        (src / f.name).symlink_to(f)
    (src / "tokenizer.json").write_text("{}")
    assert load_config(TINY, [f"model.init_from={src}"]).data.tokenizer == str(src)
    assert load_config(TINY, [f"model.init_from={src}", "data.tokenizer=/x"]).data.tokenizer \
        == "/x"


def _rank(overrides):
    import torch.distributed as dist

    from distca.bootstrap import start_process_group
    from distca.rank import make_rank
    if not dist.is_initialized():
        start_process_group(DistBackend.gloo, 0, 1, None)
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    return make_rank(load_config(TINY, ["parallel.dp=1"] + overrides))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_rank_loads_the_source_weights(hf_dir, precision):
    from safetensors.torch import load_file

    hf = {}
    for f in hf_dir.glob("*.safetensors"):
        hf.update(load_file(str(f)))
    expected = megatron_from_hf(hf, M)
    step = _rank([f"model.init_from={hf_dir}", f"trainer.precision={precision}"])
    before = {k: v.clone() for k, v in step.full_model_state().items()}
    step.role.init_from(str(hf_dir))
    full = step.full_model_state()
    assert full.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(full[name], value.to(full[name].dtype)), name
        assert not torch.equal(before[name], full[name]), name
    if precision == "bf16":  # masters are the source's fp32 values, not the bf16 rounding
        opt = step.optimizer
        params = dict(step.model.named_parameters())
        names = [n for n, q in params.items() if q.requires_grad]
        for m, (i, a, b) in zip(opt.master, opt.pieces):
            assert torch.equal(m, expected[names[i]].reshape(-1)[a:b])


def test_focusft_rank_starts_from_the_source(hf_dir):
    """FocuSFT's step holds the same role: its weights are the source's, and a bilevel step
    runs from them."""
    import itertools

    import numpy as np

    from distca.batch import PackedBatch

    step = _rank([f"model.init_from={hf_dir}", "focusft.enabled=true", "cad.enabled=false"])
    step.role.init_from(str(hf_dir))
    qkv = "decoder.layers.1.self_attention.linear_qkv.weight"
    loaded = step.full_model_state()[qkv].clone()
    reply = np.array([False] * 10 + [True] * 8 + [False] * 12 + [True] * 18)
    tokens = np.random.default_rng(0).integers(0, M.vocab_size, reply.size)
    labels = np.where(reply, np.roll(tokens, -1), -100)
    turns = [(k, len(list(g))) for k, g in itertools.groupby(reply)]
    batch = PackedBatch(tokens, labels, np.array([reply.size]), reply.size,
                        np.array([n for _, n in turns]), np.array([not k for k, _ in turns]))
    stats = step.train_step([batch])
    assert stats["loss"] > 0 and not torch.equal(step.full_model_state()[qkv], loaded)
