"""``distca train`` with ``model.init_from`` end to end (Ray): a run from a Hugging Face
directory at tp=2 logs transformers' loss of its first batch and leaves the source untouched;
a second run from the first run's checkpoint (another layout: dp=2) logs the loss
transformers computes with that checkpoint's ``export-hf`` output."""

from __future__ import annotations

import hashlib

import pytest
from train_helpers import metrics, run_distca, save_tiny_hf_llama, transformers_loss

from distca.config import load_config
from distca.data import make_dataset

pytest.importorskip("transformers")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = "recipes/tiny.yaml"
COMMON = ["trainer.steps=1", "attention.telemetry_interval=0", "optim.lr=1e-2",
          "optim.warmup_fraction=0"]


def _digest(directory) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _step1_loss_oracle(hf_dir, overrides) -> float:
    cfg = load_config(TINY, overrides)
    return transformers_loss(hf_dir, make_dataset(cfg).step_batches(1))


def test_train_from_hf_then_from_its_checkpoint_in_another_layout(tmp_path):
    source = tmp_path / "hf"
    save_tiny_hf_llama(source)
    before = _digest(source)

    first = [f"model.init_from={source}", "parallel.dp=1", "parallel.tp=2",
             f"trainer.run_dir={tmp_path / 'run1'}", "data.tokens_per_rank=256",
             "data.max_length=256", *COMMON]
    out = run_distca("train", TINY, *first)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "model.preset=tiny is not used" in out.stderr
    loss = metrics(tmp_path / "run1")[0]["loss"]
    assert abs(loss - _step1_loss_oracle(source, first)) <= 1e-4 * loss
    assert _digest(source) == before  # the source is read, never written

    # the first run's checkpoint (saved at tp=2) starts a dp=2 run; its weights are exported
    assert run_distca("export-hf", str(tmp_path / "run1"), str(tmp_path / "exported")) \
        .returncode == 0
    second = [f"model.init_from={tmp_path / 'run1'}", "parallel.dp=2",
              f"trainer.run_dir={tmp_path / 'run2'}", "data.tokens_per_rank=128",
              "data.max_length=128", *COMMON]
    out = run_distca("train", TINY, *second)
    assert out.returncode == 0, out.stderr[-3000:]
    loss = metrics(tmp_path / "run2")[0]["loss"]
    assert abs(loss - _step1_loss_oracle(tmp_path / "exported", second)) <= 1e-4 * loss
