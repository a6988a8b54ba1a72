"""Shared helpers for the training tests: run the CLI, read a run, watch sockets."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def distca_cmd(*args: str) -> list[str]:
    """The installed console script (``python -m distca.cli`` would load the CLI twice)."""
    return [str(Path(sys.executable).parent / "distca"), *args]


def run_distca(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(distca_cmd(*args), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def descendants(root: int) -> set[int]:
    """``root`` and every live process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, []))
    return found


_LOOPBACK = re.compile(r"^(127\.\d+\.\d+\.\d+|\[::ffff:127\.\d+\.\d+\.\d+\]|\[::1\]):")


class SocketWatch:
    """Samples ``ss -tanp`` while a process tree runs; keeps the sockets that tree owns."""

    def __init__(self, root: int, interval: float = 0.5):
        self.root = root
        self.interval = interval
        self.sockets: list[tuple[str, str, str]] = []  # (state, local, peer)
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            tree = descendants(self.root)
            self.pids |= tree
            out = subprocess.run(["ss", "-tanp"], capture_output=True, text=True).stdout
            for line in out.splitlines()[1:]:
                owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
                if owners & tree:
                    fields = line.split()
                    self.sockets.append((fields[0], fields[3], fields[4]))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def non_loopback(self) -> list[tuple[str, str, str]]:
        bad = []
        for state, local, peer in self.sockets:
            if not _LOOPBACK.match(local) or (state != "LISTEN" and not _LOOPBACK.match(peer)):
                bad.append((state, local, peer))
        return bad


def save_tiny_hf_llama(directory: Path, layers: int = 4) -> None:
    """A random Llama (hidden 128, 4 heads over 2 KV heads, the tiny preset's vocabulary of
    512) saved by transformers at ``directory``; weights N(0, 0.1) so attention is not flat."""
    import torch
    import transformers

    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=352,
                                      num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=512, rms_norm_eps=1e-5,
                                      max_position_embeddings=4096, rope_theta=10000.0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(directory)


def transformers_loss(source, batches) -> float:
    """Mean next-token cross-entropy of transformers' model of ``source`` over the loss
    tokens of ``batches`` (a step's micro-batches), each document run on its own (packed
    documents do not see each other): the oracle of a step's loss."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(source),
                                                              dtype=torch.float32).eval()
    total, count = 0.0, 0
    for batch in batches:
        total, count = _add_losses(model, batch, total, count)
    return total / count


def _add_losses(model, batch, total: float, count: int) -> tuple[float, int]:
    import torch
    import torch.nn.functional as F

    start = 0
    for n in batch.doc_lengths.tolist():
        ids = torch.as_tensor(batch.tokens[start:start + n]).view(1, -1)
        labels = torch.as_tensor(batch.labels[start:start + n])
        with torch.no_grad():
            logits = model(ids).logits[0].double()
        mask = labels != -100
        total += float(F.cross_entropy(logits[mask], labels[mask], reduction="sum"))
        count += int(mask.sum())
        start += n
    return total, count
