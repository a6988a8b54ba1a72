"""model.recompute recomputes the linear halves in backward and never core attention."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from distca.config import load_config

pytestmark = pytest.mark.usefixtures("single_process_group")
ROOT = Path(__file__).resolve().parents[2]


def _counted_step(monkeypatch, mode: str, ping_pong: bool):
    """One forward and backward of tiny on one rank; how often fc1, fc2 and the attention kernel
    ran, the loss and the gradients."""
    import torch.distributed as dist

    import distca.model.runtime as runtime_module
    from distca.bootstrap import start_process_group

    if not dist.is_initialized():
        start_process_group(load_config(ROOT / "recipes/tiny.yaml").parallel.backend, 0, 1,
                            None, interface="lo")
    calls = Counter()
    kernel = runtime_module.core_attention

    def counted_kernel(*args, **kwargs):
        calls["attention"] += 1
        return kernel(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(runtime_module, "core_attention", counted_kernel)
        return _run(calls, mode, ping_pong)


def _run(calls: Counter, mode: str, ping_pong: bool):
    from runtime_harness import skewed_batch

    from distca.rank import make_rank

    cfg = load_config(ROOT / "recipes/tiny.yaml", [
        "parallel.dp=1", f"model.recompute={mode}", f"cad.ping_pong={str(ping_pong).lower()}"])
    step = make_rank(cfg)
    for layer in step.model.decoder.layers:
        for name in ("linear_fc1", "linear_qkv"):
            getattr(layer.mlp if name == "linear_fc1" else layer.self_attention, name) \
                .register_forward_hook(lambda *a, name=name: calls.update([name]))
    stats = step.forward_backward([skewed_batch(1, 256, [200, 30, 20], seed=3)])
    grads = {n: q.grad.clone() for n, q in step.model.named_parameters()}
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    return calls, stats["loss"], grads


@pytest.mark.parametrize("ping_pong", [False, True])
def test_full_recomputes_both_halves_selective_the_mlp_attention_never(monkeypatch, ping_pong):
    base, loss, grads = _counted_step(monkeypatch, "none", ping_pong)
    layers = 4
    assert base["linear_fc1"] == base["linear_qkv"] == layers
    for mode, qkv_runs in (("selective", 1), ("full", 2)):
        calls, got_loss, got_grads = _counted_step(monkeypatch, mode, ping_pong)
        assert calls["linear_fc1"] == 2 * layers and calls["linear_qkv"] == qkv_runs * layers
        assert calls["attention"] == base["attention"]  # core attention runs once a layer
        assert got_loss == loss
        for name, grad in grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-6, atol=0)
