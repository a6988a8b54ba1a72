"""`distca memory`: the recipes fit their devices, the parts add up, train refuses early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distca.cli import main
from distca.config import load_config
from distca.memory.estimate import estimate, fast_weight_bytes, stage_params

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"


@pytest.mark.parametrize("recipe, device_gib, low, high", [
    ("codellama-34b-512k.yaml", 118, 90, 110),  # H200 (131 GiB) less 10% headroom
    ("llama3-8b-128k.yaml", 74.5, 18, 30),  # H100 80 GB
    ("qwen2.5-7b-focusft.yaml", 74.5, 45, 65),  # H100 80 GB, like the FocuSFT reference
])
def test_real_recipes_fit_the_devices_they_name(recipe, device_gib, low, high):
    cfg = load_config(RECIPES / recipe)
    assert cfg.parallel.dp * cfg.data.tokens_per_rank >= cfg.data.max_length
    assert cfg.trainer.device_memory_gib == device_gib
    est = estimate(cfg)
    assert est.fits and low <= est.per_rank_gib <= high, est.as_dict()


def test_the_paper_setting_needs_recompute_and_sequence_parallelism_helps():
    def gib(*overrides):
        return estimate(load_config(RECIPES / "codellama-34b-512k.yaml", list(overrides)),
                        attention_per_layer=0.0).per_rank_gib

    assert gib("model.recompute=none") > 118
    assert gib("model.recompute=none", "parallel.sequence_parallel=false") > 118
    assert gib() < gib("parallel.sequence_parallel=false")


@pytest.mark.parametrize("overrides, key", [
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "data.tokens_per_rank=1023"],
     "parallel.sequence_parallel"),
    (["trainer.device_memory_gib=-1"], "trainer.device_memory_gib"),
    (["model.recompute=some"], "model.recompute"),
])
def test_bad_memory_keys_exit_2_naming_the_key(capsys, overrides, key):
    assert main(["config", "show", str(RECIPES / "tiny.yaml"), *overrides]) == 2
    assert key in capsys.readouterr().err


def test_full_recompute_keeps_one_sharded_input_a_layer():
    def activations(mode):
        cfg = load_config(RECIPES / "llama3-8b-128k.yaml", [f"model.recompute={mode}",
                                                            "parallel.sequence_parallel=false"])
        return estimate(cfg, attention_per_layer=0.0).parts["activations"]

    assert activations("full") < activations("selective") / 5
    assert activations("selective") < activations("none") / 2


def test_fast_weight_memory_follows_the_adapted_layers_and_tp_slices():
    """FocuSFT's adapters (recomputed inputs: the adapters and their gradients only) sit on
    the stages holding the adapted layers, each tensor rank with its slice."""
    def fast(stage, *overrides):
        cfg = load_config(RECIPES / "tiny-focusft.yaml", ["model.recompute=full", *overrides])
        return fast_weight_bytes(cfg, stage)

    whole = fast(0)
    assert whole > 0
    assert fast(0, "parallel.pp=2") == 0 and fast(1, "parallel.pp=2") == whole  # layers 2-3 of 4
    low = "focusft.layer_fraction=0.75"  # layers 1-3: one on stage 0, two on stage 1
    assert fast(0, "parallel.pp=2", low) + fast(1, "parallel.pp=2", low) == fast(0, low)
    # fp32 adapters and gradients of 2 layers x 3 targets: rank x (hidden + ffn) values each,
    # whose ffn side halves at tp=2
    f, ffn = 8, 352
    assert whole - fast(0, "parallel.tp=2") == 2 * 4.0 * 2 * 3 * f * ffn / 2


def test_parameter_count_is_the_models(single_process_group):
    from distca.bootstrap import start_process_group
    from distca.rank import make_rank

    start_process_group(load_config(RECIPES / "tiny.yaml").parallel.backend, 0, 1, None,
                        interface="lo")
    for overrides in (["model.qkv_bias=true", "model.learnable_sinks=true"],
                      ["model.gated_attention=true"]):
        cfg = load_config(RECIPES / "tiny.yaml", ["parallel.dp=1", *overrides])
        step = make_rank(cfg)
        assert sum(q.numel() for q in step.params) == stage_params(cfg, 0)
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()


def test_memory_command_prints_parts_as_json(capsys):
    code = main(["memory", str(RECIPES / "tiny.yaml"), "model.recompute=full",
                 "trainer.device_memory_gib=1", "--json"])
    got = json.loads(capsys.readouterr().out)
    assert code == 0 and got["fits"] and got["device_gib"] == 1
    assert abs(sum(got["parts"].values()) - got["per_rank_gib"]) < 1e-9
    assert set(got["parts"]) >= {"weights", "gradients", "optimizer", "activations",
                                 "attention_buffers", "logits", "fast_weights"}


def test_train_refuses_a_recipe_that_does_not_fit_before_ray_starts(capsys, monkeypatch):
    import distca.train.ray_cluster as ray_cluster

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(ray_cluster, "connect", no_ray)
    tiny = str(RECIPES / "tiny.yaml")
    full = estimate(load_config(tiny, ["model.recompute=full"])).per_rank_gib
    code = main(["train", tiny, f"trainer.device_memory_gib={full * 1.05}"])
    err = capsys.readouterr().err
    assert code == 2
    largest = estimate(load_config(tiny)).largest
    assert "trainer.device_memory_gib" in err and f"largest part {largest}" in err
    assert "predicted to fit: " in err and "model.recompute=full (" in err
