"""FocuSFT step (design §6) in one process: SFT equivalence, inner loop, fast-weight lifecycle."""

from __future__ import annotations

import json
import math

import pytest
import torch
from runtime_harness import ROOT, multiturn_docs

from distca.data.chat import pack_conversations

RECIPE = ROOT / "recipes" / "tiny-focusft.yaml"
BASE = ["parallel.dp=1", "trainer.seed=3", "cad.min_shard_tokens=4"]


def chat_batch(seed: int, num_ranks: int = 1, tokens_per_rank: int = 192):
    return pack_conversations(multiturn_docs(seed, [120, 1, 40, 25]), num_ranks, tokens_per_rank)


pytestmark = pytest.mark.usefixtures("one_rank_group")


def test_step_and_focusft_import_in_either_order():
    """FocusftStep extends Step and the roles build FocuSFT's fast weights: a fresh process
    must import them in either order."""
    import subprocess
    import sys

    for code in ("import distca.step; from distca.focusft.step import FocusftStep",
                 "from distca.focusft.step import FocusftStep; import distca.step"):
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stderr[-2000:]


def make(step_cls, overrides=()):
    from distca.config import load_config
    from distca.mesh import ProcessMesh

    cfg = load_config(RECIPE, BASE + list(overrides))
    return step_cls(cfg, ProcessMesh.build(cfg))


@pytest.mark.parametrize("ping_pong", [True, False])
def test_inner_steps_zero_is_exactly_an_sft_step(ping_pong):
    from distca.focusft.step import FocusftStep
    from distca.step import Step

    common = ["model.learnable_sinks=true", "model.gated_attention=true",
              f"cad.ping_pong={str(ping_pong).lower()}"]
    focus = make(FocusftStep, ["focusft.inner_steps=0"] + common)
    sft = make(Step, common)
    with torch.no_grad():  # a zero sink would hide sink bugs
        for name, p in focus.model.named_parameters():
            if name.endswith("sinks"):
                p.copy_(torch.linspace(-3, 3, p.numel()))
    sft.model.load_state_dict(focus.model.state_dict())
    batches = [chat_batch(1), chat_batch(2)]
    got, want = focus.forward_backward(batches), sft.forward_backward(batches)
    assert got["loss"] == want["loss"]
    named = list(zip(focus.model.named_parameters(), sft.model.named_parameters()))
    for (name, p), (_, q) in named:
        assert torch.equal(p.grad, q.grad), f"{name}: gradients differ"
    assert all(q.grad.abs().sum() > 0 for q in sft.params)
    got, want = focus.train_step(batches), sft.train_step(batches)
    assert got["loss"] == want["loss"] and got["grad_norm"] == want["grad_norm"]
    for (name, p), (_, q) in named:
        assert torch.equal(p, q), f"{name}: updated weights differ"
    for p, q in zip(focus.params, sft.params):
        for key, value in sft.optimizer.adamw.state[q].items():
            assert torch.equal(focus.optimizer.adamw.state[p][key], value), key


def test_inner_loop_lowers_the_inner_loss_on_a_fixed_batch():
    from distca.focusft.step import FocusftStep

    engine = make(FocusftStep, ["focusft.inner_steps=3"])
    calls = []
    attend = engine.runtime.attend
    engine.runtime.attend = lambda *args: calls.append(1) or attend(*args)
    stats = engine.forward_backward([chat_batch(5)])
    del engine.runtime.attend
    # everything below the first fast weight, attention of the adapted layer included, runs
    # once per step: one attention forward per layer, however many inner steps
    # once per step; the adapted layers above the first run per inner step and in the outer one
    layers = len(engine.model.decoder.layers)
    assert len(calls) == layers - engine.num_top + 1 + (engine.num_top - 1) * (3 + 1)
    losses = [stats[f"inner_loss_{i}"] for i in range(3)] + [stats["loss"]]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    # the base weights saw the outer loss only: same weights, no adaptation -> higher loss
    plain = make(FocusftStep, ["focusft.inner_steps=0"])
    plain.model.load_state_dict(engine.model.state_dict())
    assert plain.forward_backward([chat_batch(5)])["loss"] == pytest.approx(losses[0], rel=1e-6)


def test_inner_loss_is_a_token_mean_over_micro_batches_like_the_loss():
    """inner_loss_0 is the loss before any adaptation: the SFT loss of the same weights, a mean
    over every loss token of the step, not a mean of per-micro-batch means."""
    from distca.focusft.step import FocusftStep

    batches = [chat_batch(5), pack_conversations(multiturn_docs(6, [30]), 1, 192)]
    counts = [int((b.labels != -100).sum()) for b in batches]
    assert max(counts) > 2 * min(counts)  # unequal micro-batches tell the two means apart
    engine = make(FocusftStep, ["focusft.inner_steps=1"])
    plain = make(FocusftStep, ["focusft.inner_steps=0"])
    plain.model.load_state_dict(engine.model.state_dict())
    got = engine.forward_backward(batches)["inner_loss_0"]
    assert got == pytest.approx(plain.forward_backward(batches)["loss"], rel=1e-6)


def test_fast_weights_reset_every_step_and_stay_private():
    from distca.focusft.step import FocusftStep
    from distca.step import Step

    engine = make(FocusftStep)
    fast = engine.fast
    # layers int(4 * 0.65) = 2 and 3; gate/up/down, A and B each
    assert engine.num_top == 2 and len(fast.tensors) == 12
    assert fast.names[:6] == [f"layer3.{t}.{m}" for t in ("gate_proj", "up_proj", "down_proj")
                              for m in "AB"]
    # adapters live on the top layer's MLP only
    top = engine.model.decoder.layers[-1].mlp
    assert len(top.linear_fc1._forward_hooks) == 1 and len(top.linear_fc2._forward_hooks) == 1
    assert not engine.model.decoder.layers[0].mlp.linear_fc1._forward_hooks

    snapshots = []
    reset = fast.reset

    def recording_reset(generator):
        reset(generator)
        snapshots.append([t.detach().clone() for t in fast.tensors])

    fast.reset = recording_reset
    adapted = []
    for step in range(2):
        engine.train_step([chat_batch(10 + step)])
        adapted.append([t.detach().clone() for t in fast.tensors])
    assert len(snapshots) == 2
    for fresh, after in zip(snapshots, adapted):
        for a, b in zip(fresh[0::2], fresh[1::2]):
            bound = 1 / math.sqrt(a.shape[1])
            assert torch.all(b == 0) and a.abs().max() <= bound and a.std() > bound / 3
        assert any(not torch.equal(x, y) for x, y in zip(fresh, after))  # the inner loop ran
        assert all(b.abs().sum() > 0 for b in after[1::2])
    assert not torch.equal(snapshots[0][0], snapshots[1][0])  # a new draw every step
    # the outer backward treats the adapted fast weights as constants: no gradient is
    # computed for them, none left behind
    assert all(t.grad is None for t in fast.tensors)

    fast_ids = {id(t) for t in fast.tensors}
    assert not fast_ids & {id(p) for g in engine.optimizer.adamw.param_groups for p in g["params"]}
    assert not fast_ids & {id(p) for p in engine.model.parameters()}
    assert not fast_ids & {id(p) for p in engine.params}  # the gradient all-reduce set
    plain = make(Step)
    plain.train_step([chat_batch(10)])
    state = {k: v.detach().clone() for k, v in engine.full_model_state().items()}
    assert state.keys() == plain.full_model_state().keys()  # no fast weights in the model
    assert not any(torch.equal(v, t) for v in state.values() for t in adapted[-1]
                   if v.shape == t.shape)
    # outside the bilevel step the adapters are inert: evaluation sees the base model alone
    plain.load_full_model_state(state)
    assert engine.eval_loss([chat_batch(12)]) == plain.eval_loss([chat_batch(12)])


def test_chat_data_feeds_the_engine(tmp_path):
    from distca.config import load_config
    from distca.data.dataset import make_dataset
    from distca.data.tokenizer import load_tokenizer
    from distca.evals.tasks import generate

    tok = load_tokenizer(None)
    path = tmp_path / "niah.jsonl"
    examples = generate("niah", 300, 4, 0, lambda text: len(tok.encode(text)))
    path.write_text("".join(json.dumps(e.to_chat()) + "\n" for e in examples))
    cfg = load_config(RECIPE, ["data.kind=chat", f"data.paths=[{path}]",
                               "data.tokens_per_rank=512"])
    batches = make_dataset(cfg).step_batches(1)
    assert len(batches) == 1 and batches[0].num_ranks == 2
    b = batches[0]
    assert b.turn_lengths is not None and b.turn_is_context.any() and not b.turn_is_context.all()
    assert (b.labels != -100).sum() > 0
