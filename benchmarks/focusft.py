"""FocuSFT vs SFT on a synthetic long-context task, CPU, tiny model (design §6).

Same data, steps, seed and initial weights for both; the two engines step in alternation so
the step-time ratio is measured side by side under the same machine load. Reports:

* accuracy: greedy decoding of the answer on held-out examples (RULER match-all score);
* attention mass of the reply tokens on the document's first token (the classic sink) and on
  the context (non-reply) tokens, mean over layers, heads and reply rows, on fixed probe
  examples over training (the FocuSFT paper's exact sink metric is not public; design §3);
* the FocuSFT/SFT step-time ratio (goal <= 1.6x);
* one FocuSFT step on a single long conversation (default 64K tokens) in a fresh process, and
  its peak RSS (the reference's dense S x S fp32 mask alone would be S*S*4 bytes).

    .venv/bin/python benchmarks/focusft.py            # writes benchmarks/results/focusft.{md,png}
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny-focusft.yaml"


def _init_dist() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def _conversations(task: str, length: int, n: int, seed: int):
    """[(tokens, is_reply, example)] of ``n`` chat examples, byte tokenizer."""
    from distca.data.chat import ChatTemplate, tokenize_chat
    from distca.data.tokenizer import load_tokenizer
    from distca.evals.tasks import generate

    tok, template = load_tokenizer(None), ChatTemplate(None)
    examples = generate(task, length, n, seed, lambda text: len(tok.encode(text)))
    return [(*tokenize_chat(e.to_chat()["messages"], None, tok, template), e) for e in examples]


def _set_single_batch(engine, batch) -> torch.Tensor:
    """Point ``engine``'s attention runtime at a one-rank ``batch``; returns tokens (1, N)."""
    from distca.parallel.layout import build_layout

    plan = engine._plan(batch)
    n = batch.tokens_per_rank
    layout = build_layout(plan.servers, 0, 1, n, 1, [0], engine.device)
    engine.runtime.set_batch(torch.as_tensor(batch.position_ids()), layout)
    return torch.as_tensor(batch.tokens).view(1, -1)


def _turn_batch(ids: np.ndarray, prompt_len: int):
    """One conversation: the prompt as a context turn, what follows as a reply turn."""
    from distca.batch import PackedBatch

    n = ids.size
    turns = [prompt_len] + ([n - prompt_len] if n > prompt_len else [])
    return PackedBatch(ids.astype(np.int64), np.full(n, -100, np.int64), np.array([n]), n,
                       np.array(turns, np.int64), np.array([True, False][:len(turns)]))


@torch.no_grad()
def greedy_answer(engine, prompt: np.ndarray, max_new: int) -> bytes:
    engine.model.eval()
    ids = prompt.copy()
    for _ in range(max_new):
        tokens = _set_single_batch(engine, _turn_batch(ids, prompt.size))
        logits = engine.model(tokens, None, None)
        ids = np.append(ids, int(logits[0, -1].argmax()))
    return bytes(int(t) for t in ids[prompt.size:] if t < 256)


@torch.no_grad()
def attention_masses(engine, convs) -> tuple[float, float]:
    """Mean (first-token mass, context mass) of reply rows over layers, heads and probes."""
    engine.model.eval()
    first, context = [], []
    records = []
    original = engine.runtime.attend

    def spy(q, k, v, scale):
        out, lse = original(q, k, v, scale)
        records.append((q, k, lse, scale))
        return out, lse

    engine.runtime.attend = spy
    try:
        for ids, reply, _ in convs:
            records.clear()
            prompt_len = int(np.argmax(reply))
            engine.model(_set_single_batch(engine, _turn_batch(ids, prompt_len)), None, None)
            rows = np.flatnonzero(reply)
            for q, k, lse, scale in records:
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)[:prompt_len]
                s = torch.einsum("rhd,nhd->rhn", q[rows].float(), k.float()) * scale
                p = torch.exp(s - lse[rows].unsqueeze(-1))
                first.append(float(p[..., 0].mean()))
                context.append(float(p.sum(-1).mean()))
    finally:
        del engine.runtime.attend
    return float(np.mean(first)), float(np.mean(context))


def compare(args) -> dict:
    from distca.config import load_config
    from distca.data.chat import pack_conversations
    from distca.engine import Engine
    from distca.evals.tasks import score
    from distca.focusft import FocusftEngine

    train = _conversations(args.task, args.length, args.train, seed=1)
    test = _conversations(args.task, args.length, args.test, seed=2)
    tokens_per_rank = -(-max(c[0].size for c in train) // 64) * 64
    cfg = load_config(RECIPE, ["parallel.dp=1", "data.paths=[unused.jsonl]",
                               f"trainer.steps={args.steps}", f"trainer.seed={args.seed}",
                               f"data.tokens_per_rank={tokens_per_rank}"])
    engines = {"sft": Engine(cfg), "focusft": FocusftEngine(cfg)}
    engines["focusft"].model.load_state_dict(engines["sft"].model.state_dict())
    curves = {name: [] for name in engines}
    times = {name: [] for name in engines}
    for step in range(args.steps + 1):
        if step % args.probe_every == 0 or step == args.steps:
            for name, engine in engines.items():
                curves[name].append((step, *attention_masses(engine, test[:args.probes])))
        if step == args.steps:
            break
        batch = pack_conversations([c[:2] for c in [train[step % len(train)]]], 1,
                                   tokens_per_rank)
        for name, engine in engines.items():
            start = time.perf_counter()
            stats = engine.train_step([batch])
            times[name].append(time.perf_counter() - start)
            print(f"step {step} {name}: loss {stats['loss']:.4f} "
                  f"{times[name][-1]:.2f}s", flush=True)
    accuracy = {}
    for name, engine in engines.items():
        scores = []
        for ids, reply, example in test:
            prompt_len = int(np.argmax(reply))
            answer = greedy_answer(engine, ids[:prompt_len], int(reply.sum()))
            scores.append(score(example.answers, answer.decode("utf-8", "replace")))
        accuracy[name] = float(np.mean(scores))
    median = {n: statistics.median(t[1:]) for n, t in times.items()}
    return {"tokens_per_step": tokens_per_rank, "accuracy": accuracy, "step_time_s": median,
            "ratio": median["focusft"] / median["sft"], "curves": curves}


def _long_step(length: int, overrides: list[str], queue) -> None:
    """One FocuSFT step on one conversation of ``length`` tokens: a 64-token reply."""
    _init_dist()
    from distca.config import load_config
    from distca.data.chat import pack_conversations
    from distca.focusft import FocusftEngine

    cfg = load_config(RECIPE, ["parallel.dp=1", "data.paths=[unused.jsonl]",
                               f"data.tokens_per_rank={length}"] + overrides)
    engine = FocusftEngine(cfg)
    rng = np.random.default_rng(0)
    reply = np.zeros(length, bool)
    reply[-64:] = True
    batch = pack_conversations([(rng.integers(0, 256, length), reply)], 1, length)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    stats = engine.train_step([batch])
    queue.put({"length": length, "seconds": time.perf_counter() - start, "loss": stats["loss"],
               "rss_before_mib": before / 1024,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "dense_mask_gib": length * length * 4 / 2**30})


def long_step(length: int, overrides: list[str]) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_long_step, args=(length, overrides, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def write_report(result: dict, out: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, curve in result["curves"].items():
        steps, first, context = zip(*curve)
        axes[0].plot(steps, first, marker="o", label=name)
        axes[1].plot(steps, context, marker="o", label=name)
    axes[0].set_title("reply rows: mass on first token")
    axes[1].set_title("reply rows: mass on context tokens")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "focusft.png", dpi=110)
    long = result.get("long")
    c = result["curves"]
    lines = [
        "# FocuSFT vs SFT (CPU, tiny model)", "",
        f"`{' '.join(['benchmarks/focusft.py'] + args.argv)}`: task `{args.task}` at "
        f"~{args.length} prompt tokens (byte tokenizer), {args.steps} steps, one conversation "
        f"per step ({result['tokens_per_step']} tokens/step incl. padding), seed {args.seed}, "
        "recipe `tiny-focusft` (4 layers, hidden 128; fast LoRA rank 8 on the top layer's MLP, "
        "2 inner SGD steps at lr 1.0). Both engines start from the same weights and step in "
        "alternation.", "",
        "| | SFT | FocuSFT |", "|---|---|---|",
        f"| accuracy (greedy, {args.test} held-out) | {result['accuracy']['sft']:.3f} | "
        f"{result['accuracy']['focusft']:.3f} |",
        f"| median step time (s) | {result['step_time_s']['sft']:.3f} | "
        f"{result['step_time_s']['focusft']:.3f} |",
        f"| first-token mass of reply rows, start -> end | {c['sft'][0][1]:.4f} -> "
        f"{c['sft'][-1][1]:.4f} | {c['focusft'][0][1]:.4f} -> {c['focusft'][-1][1]:.4f} |",
        f"| context mass of reply rows, start -> end | {c['sft'][0][2]:.4f} -> "
        f"{c['sft'][-1][2]:.4f} | {c['focusft'][0][2]:.4f} -> {c['focusft'][-1][2]:.4f} |",
        "", f"**FocuSFT/SFT step-time ratio: {result['ratio']:.2f}x** (goal <= 1.6x: "
        f"{'met' if result['ratio'] <= 1.6 else 'MISSED'}).", "",
        "Masses are our definitions (design §3): mean over layers, heads and reply-token rows "
        f"of {args.probes} fixed held-out examples of the attention probability on the "
        "document's first token and on all context (non-reply) tokens, measured on the base "
        "model (fast weights inert).", "", "![curves](focusft.png)", ""]
    if long:
        lines += [
            f"## One FocuSFT step at {long['length']:,} tokens", "",
            f"Model: {args.long_model}; one conversation ({long['length'] - 64:,}-token "
            "bidirectional context turn + 64-token causal reply).", "",
            "| step time (s) | RSS before step (MiB) | peak RSS (MiB) | dense S×S fp32 mask "
            "alone (GiB) |", "|---|---|---|---|",
            f"| {long['seconds']:.1f} | {long['rss_before_mib']:.0f} | "
            f"{long['peak_rss_mib']:.0f} | {long['dense_mask_gib']:.1f} |", ""]
    (out / "focusft.md").write_text("\n".join(lines))
    (out / "focusft.json").write_text(json.dumps(result, indent=1))


def main() -> None:
    import sys

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="niah")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--train", type=int, default=16)
    p.add_argument("--test", type=int, default=8)
    p.add_argument("--probes", type=int, default=2)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--probe-every", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--long", type=int, default=65536, help="0 skips the long-context step")
    p.add_argument("--long-model", default="model.num_layers=2,model.hidden_size=64,"
                   "model.num_attention_heads=2,model.num_kv_heads=1,model.ffn_hidden_size=128")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    args.argv = sys.argv[1:]
    _init_dist()
    result = compare(args)
    print(json.dumps({k: v for k, v in result.items() if k != "curves"}), flush=True)
    if args.long:
        result["long"] = long_step(args.long, args.long_model.split(","))
        print(json.dumps(result["long"]), flush=True)
    write_report(result, Path(args.out), args)


if __name__ == "__main__":
    main()
