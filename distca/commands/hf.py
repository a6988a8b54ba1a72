"""``distca import-hf HF_DIR OUT_CKPT`` and ``distca export-hf CKPT OUT_DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distca.errors import UsageError


def _fresh_output(path: str) -> Path:
    """``path`` if it is new or an empty directory: neither command writes over a model."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out}: exists and is not empty")
    return out


def run_import(args: argparse.Namespace) -> int:
    from distca.hf.config_map import HFFormatError
    from distca.hf.io import TOKENIZER_DIR, read_hf, write_checkpoint

    out = _fresh_output(args.out_ckpt)
    tokenizer = out / TOKENIZER_DIR
    try:
        m, state = read_hf(args.hf_dir, tokenizer_out=tokenizer)
        step_dir = write_checkpoint(out, m, state, origin=str(Path(args.hf_dir).resolve()),
                                    tokenizer_dir=tokenizer)
    except HFFormatError as exc:  # raised before anything is written (see read_hf)
        raise UsageError(str(exc)) from exc
    params = sum(v.numel() for v in state.values())
    print(f"imported {args.hf_dir} ({params / 1e6:.1f}M parameters) to {step_dir}",
          file=sys.stderr)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from distca.hf.config_map import HFFormatError
    from distca.hf.io import TOKENIZER_DIR, read_checkpoint, write_hf
    from distca.hf.weights import hf_from_megatron

    out = _fresh_output(args.out_dir)
    try:
        cfg, state, run = read_checkpoint(args.ckpt)
        hf_state = hf_from_megatron(state, cfg.model, str(args.ckpt))
        tokenizer = Path(cfg.data.tokenizer) if cfg.data.tokenizer else run / TOKENIZER_DIR
        write_hf(out, cfg.model, hf_state, tokenizer_dir=tokenizer)
    except HFFormatError as exc:
        raise UsageError(str(exc)) from exc
    print(f"exported {args.ckpt} to {args.out_dir}", file=sys.stderr)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-hf", help="convert a Llama/Qwen2 HF model (or GGUF) to a checkpoint")
    p.add_argument("hf_dir", help="HF model directory (config.json + safetensors) or a .gguf")
    p.add_argument("out_ckpt", help="new run directory; the model lands in checkpoints/step_0")
    p.set_defaults(run=run_import)
    p = sub.add_parser("export-hf", help="write a checkpoint as a transformers model directory")
    p.add_argument("ckpt", help="a run directory (its latest checkpoint) or a step directory")
    p.add_argument("out_dir", help="new or empty output directory (config.json + "
                                   "model.safetensors)")
    p.set_defaults(run=run_export)
