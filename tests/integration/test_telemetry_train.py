"""``distca train`` from an imported model (``model.init_from``, a Hugging Face directory)
logs the attention statistics at ``attention.telemetry_interval`` into ``metrics.jsonl`` (Ray,
CAD with ping-pong): SFT on text data with every rank an attention server, and FocuSFT on chat
data under the GLM mask with a dedicated server. The first measured row equals transformers'
eager attention probabilities of the imported model on that step's documents, in float64."""

from __future__ import annotations

import pytest
import torch
from train_helpers import metrics, run_distca, save_tiny_hf_llama

from distca.batch import IGNORE
from distca.config import load_config
from distca.data import make_dataset

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

LAYERS = 4
CASES = {  # name -> (recipe, chat data, overrides)
    "sft_text": ("recipes/tiny.yaml", False, ["data.tokens_per_rank=256"]),
    "focusft_glm_dedicated": ("recipes/tiny-focusft.yaml", True, [
        "cad.server_mode=dedicated", "cad.num_dedicated_servers=1", "data.synth.length=200",
        "data.tokens_per_rank=384"]),
}


def _document_masks(batch, chat: bool):
    """Per document of ``batch``: (start, length, allowed (n, n) bool). Text: causal. Chat: the
    GLM turn mask written out here, independently of distca's: causal, and a context turn's
    tokens also see their whole turn."""
    out, start, turn = [], 0, 0
    for length in (int(x) for x in batch.doc_lengths):
        rows = torch.arange(length)
        allowed = rows[None, :] <= rows[:, None]
        if chat:
            turn_of, context, used = [], [], 0
            while used < length:
                n, is_context = int(batch.turn_lengths[turn]), bool(batch.turn_is_context[turn])
                turn_of += [turn] * n
                context += [is_context] * n
                used, turn = used + n, turn + 1
            turn_of, context = torch.tensor(turn_of), torch.tensor(context)
            allowed |= (turn_of[:, None] == turn_of[None, :]) & context[:, None]
        out.append((start, length, allowed))
        start += length
    return out


def _eager_statistics(hf_dir, batches, chat: bool) -> dict[str, float]:
    """The step's statistics from transformers' eager probabilities, one document at a time:
    per (layer, head) means over the counted rows (reply rows of chat, every row of text)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.float64, attn_implementation="eager").eval()
    first = torch.zeros(LAYERS, 4, dtype=torch.float64)
    context = torch.zeros_like(first)
    rows = 0
    for batch in batches:
        for start, n, allowed in _document_masks(batch, chat):
            ids = torch.as_tensor(batch.tokens[start:start + n]).view(1, -1)
            labelled = torch.as_tensor(batch.labels[start:start + n] != IGNORE)
            counted = labelled if chat else torch.ones(n, dtype=torch.bool)
            response = torch.zeros(n, dtype=torch.bool)
            response[1:] = labelled[:-1]  # a key is a reply token when the row before predicts it
            mask = torch.where(allowed, 0.0, float("-inf")).double().view(1, 1, n, n)
            with torch.no_grad():
                probs = model(ids, attention_mask=mask, output_attentions=True).attentions
            for layer, p in enumerate(probs):  # (1, H, n, n)
                p = p[0][:, counted]
                first[layer] += p[..., 0].sum(-1)
                context[layer] += p[..., ~response].sum((-1, -2))
            rows += int(counted.sum())
    first, context = first / rows, context / rows
    out = {"first_token_mass": float(first.mean()),
           "sink_rate": float((first > 0.3).double().mean())}
    out.update({f"first_token_mass_layer{i}": float(first[i].mean()) for i in range(LAYERS)})
    if chat:
        out["context_mass"] = float(context.mean())
        out.update({f"context_mass_layer{i}": float(context[i].mean()) for i in range(LAYERS)})
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_imported_model_run_logs_attention_statistics_at_the_interval(tmp_path, case):
    recipe, chat, extra = CASES[case]
    save_tiny_hf_llama(tmp_path / "hf", LAYERS)
    overrides = [f"model.init_from={tmp_path / 'hf'}", f"trainer.run_dir={tmp_path / 'run'}",
                 "trainer.steps=3", "attention.telemetry_interval=2", "data.max_length=512",
                 "optim.warmup_fraction=0", *extra]
    out = run_distca("train", recipe, *overrides)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    keys = ["first_token_mass", "sink_rate"] + (["context_mass"] if chat else [])
    keys += [f"{k}_layer{i}" for k in keys if k != "sink_rate" for i in range(LAYERS)]
    for row in rows:  # the engine's steps 0 and 2 measure (the rows of steps 1 and 3)
        if row["step"] % 2:
            assert all(0.0 <= row[k] <= 1.0 for k in keys), row
        else:
            assert not any(k in row for k in keys), row
    assert ("context_mass" in rows[0]) == chat and "sink_mass" not in rows[0]
    cfg = load_config(recipe, overrides)
    want = _eager_statistics(tmp_path / "hf", make_dataset(cfg).step_batches(1), chat)
    for key, value in want.items():
        assert rows[0][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    if chat:  # the GLM mask: reply rows do see context, and the statistics are not trivial
        assert 0.05 < want["context_mass"] < 0.99
    assert 0.0 < want["first_token_mass"] < 1.0
