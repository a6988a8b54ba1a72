"""Attention statistics of training (``attention.telemetry_interval``) from every rank and
dedicated server equal a dense float64 computation (issue 18).

A single process computes the statistics of a small batch twice: densely in float64 from the
q/k that each layer's attention receives (the whole S×S softmax, learnable sink included,
under the batch's own mask), and through the step's statistics forward
(:meth:`distca.step.Step.attention_statistics`). Then ranks on 127.0.0.1 run the same forward
on the same weights — disaggregated attention with ping-pong and a dedicated attention server,
tensor or pipeline parallelism — and must report the same numbers (1e-4).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from runtime_harness import ROOT, as_single_worker, free_port, multiturn_docs, skewed_batch

from distca.attention.tasks import causal_document_tasks, multiturn_tasks, task_mask
from distca.batch import IGNORE
from distca.config import load_config
from distca.data.chat import pack_conversations
from distca.mesh import world_size
from distca.rank import make_rank

T = 64
SINKS = ["model.learnable_sinks=true", "trainer.seed=7", "cad.min_shard_tokens=4",
         "cad.tolerance=0.1", "cad.enabled=true", "cad.ping_pong=true"]
CASES = {  # name -> (recipe, data-parallel workers, overrides)
    # chat data under FocuSFT's GLM mask (context mass defined), a dedicated server
    "chat_glm_dedicated": ("tiny-focusft", 2, ["attention.mask=glm", "cad.server_mode=dedicated",
                                               "cad.num_dedicated_servers=1"]),
    # tensor parallelism: each rank holds half the heads
    "text_dp2_tp2": ("tiny", 2, ["parallel.tp=2"]),
    # pipeline parallelism (CAD's lock-step pipeline in training): each stage measures its own
    # layers, stage after stage; chat data under the GLM mask (plain SFT: FocuSFT needs pp=1)
    "chat_glm_dp2_pp2": ("tiny-focusft", 2, ["attention.mask=glm", "focusft.enabled=false",
                                             "parallel.pp=2"]),
}


def _batches(recipe: str, dp: int):
    if recipe == "tiny-focusft":
        return [pack_conversations(multiturn_docs(seed, [int(0.7 * dp * T), 1, 9, 20]), dp, T)
                for seed in (5, 6)]
    return [skewed_batch(dp, T, [int(0.7 * dp * T), 1, 5, 9, 3], seed=seed) for seed in (5, 6)]


def _config(recipe: str, extra: list[str], dp: int):
    data = ["data.kind=chat", "data.paths=[unused.jsonl]"] if recipe == "tiny-focusft" else []
    return load_config(ROOT / "recipes" / f"{recipe}.yaml",
                       SINKS + data + extra + [f"parallel.dp={dp}"])


def _spread_sinks(step) -> None:
    """Sink logits over about ±3 (a zero sink would hide sink bugs), the same on every rank."""
    with torch.no_grad():
        for name, p in step.model.named_parameters():
            if name.endswith("sinks"):
                p.copy_(torch.linspace(-3, 3, p.numel()) + 0.1 * p.numel())


def _dense(step, batches, chat: bool) -> dict[str, float]:
    """The statistics in float64 from every layer's full attention matrix (one process)."""
    captured = []
    runtime = step.runtime
    attend = runtime.attend

    def spy(q, k, v, scale, sinks=None):
        captured.append((q.detach().double(), k.detach().double(), scale,
                         None if sinks is None else sinks.detach().double()))
        return attend(q, k, v, scale, sinks)

    runtime.attend = spy
    sums = {}  # name -> [per layer, per head] sums and counts
    try:
        for batch in batches:
            captured.clear()
            with torch.no_grad():
                step.forward(batch, step.exchanges.plan(batch), blocking=True)
            n = int(batch.doc_lengths.sum())
            if chat:
                docs, turn = [], 0
                for length in batch.doc_lengths:
                    doc, used = [], 0
                    while used < length:
                        doc.append((int(batch.turn_lengths[turn]), bool(batch.turn_is_context[turn])))
                        used += int(batch.turn_lengths[turn])
                        turn += 1
                    docs.append(doc)
                mask = task_mask(multiturn_tasks(docs))
            else:
                mask = task_mask(causal_document_tasks([int(x) for x in batch.doc_lengths]))
            labelled = batch.labels[:n] != IGNORE
            counted = labelled if chat else np.ones(n, bool)
            doc_start = np.repeat(np.cumsum(batch.doc_lengths) - batch.doc_lengths,
                                  batch.doc_lengths)
            response = np.zeros(n, bool)
            response[1:] = labelled[:-1]
            response[np.unique(doc_start)] = False
            for layer, (q, k, scale, sinks) in enumerate(captured):
                q, k = q[:n], k[:n]
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                scores = torch.einsum("ihd,jhd->hij", q, k) * scale
                scores = scores.masked_fill(~mask[None], -math.inf)
                if sinks is not None:
                    sink_col = sinks.view(-1, 1, 1).expand(-1, n, 1)
                    probs = torch.softmax(torch.cat([scores, sink_col], -1), -1)
                else:
                    probs = torch.cat([torch.softmax(scores, -1), torch.zeros(q.shape[1], n, 1,
                                                                              dtype=q.dtype)], -1)
                first = probs[:, torch.arange(n), torch.as_tensor(doc_start)]  # (H, n)
                context = probs[..., :n][..., torch.as_tensor(~response)].sum(-1)
                for name, value in (("first", first), ("context", context),
                                    ("sink", probs[..., n])):
                    acc = sums.setdefault(name, {})
                    acc[layer] = acc.get(layer, 0) + value[:, torch.as_tensor(counted)].sum(1)
                rows = sums.setdefault("rows", {})
                rows[layer] = rows.get(layer, 0) + int(counted.sum())
    finally:
        del runtime.attend
    layers = sorted(sums["rows"])
    per = {name: torch.stack([sums[name][i] / sums["rows"][i] for i in layers])
           for name in ("first", "context", "sink")}
    out = {"first_token_mass": float(per["first"].mean()), "sink_mass": float(per["sink"].mean()),
           "sink_rate": float((per["first"] > 0.3).double().mean())}
    if chat:
        out["context_mass"] = float(per["context"].mean())
    for i in layers:
        out[f"first_token_mass_layer{i}"] = float(per["first"][i].mean())
    return out


def _rank_main(rank: int, world: int, port: int, case: str, outdir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    recipe, dp, extra = CASES[case]
    out = Path(outdir)
    single = world == 1
    overrides = extra
    if single:  # one process, colocated, the whole batch
        overrides = ["cad.enabled=false"] + [o for o in extra if o.startswith("attention.")]
    step = make_rank(_config(recipe, overrides, 1 if single else dp))
    batches = _batches(recipe, dp)
    if single:
        batches = [as_single_worker(b) for b in batches]
        _spread_sinks(step)
        torch.save(step.full_model_state(), out / "init.pt")
        result = {"probe": step.attention_statistics(batches),
                  "dense": _dense(step, batches, recipe == "tiny-focusft")}
    else:
        if step.optimizer is not None:
            step.load_full_model_state(torch.load(out / "init.pt"))
        result = {"probe": step.attention_statistics(batches)}
        # a training step measures them first (step 0 of the recipes' telemetry interval), on
        # the same weights, and then trains through its own exchanges (lock-step with pp > 1)
        assert step.cfg.attention.telemetry_interval and step.step == 0
        result["train"] = step.train_step(batches)
    torch.save(result, out / f"{'single' if single else rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("case", [
    "chat_glm_dedicated",
    pytest.param("text_dp2_tp2", marks=pytest.mark.slow),
    "chat_glm_dp2_pp2",
])
def test_statistics_from_every_rank_equal_the_dense_computation(tmp_path, case):
    mp.spawn(_rank_main, args=(1, free_port(), case, str(tmp_path)), nprocs=1, join=True)
    single = torch.load(tmp_path / "single.pt")
    dense, probe = single["dense"], single["probe"]
    for key, want in dense.items():
        assert probe[key] == pytest.approx(want, rel=1e-4, abs=1e-6), key
        assert 0.0 <= probe[key] <= 1.0
    recipe, dp, extra = CASES[case]
    world = world_size(_config(recipe, extra, dp))
    mp.spawn(_rank_main, args=(world, free_port(), case, str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        result = torch.load(tmp_path / f"{rank}.pt")
        got = result["probe"]
        assert got.keys() == probe.keys()
        for key, want in probe.items():
            assert got[key] == pytest.approx(want, rel=1e-4, abs=1e-6), (rank, key)
            assert result["train"][key] == got[key], (rank, key)
        assert math.isfinite(result["train"]["loss"])
