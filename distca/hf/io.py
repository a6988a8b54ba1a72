"""Reading and writing the two on-disk forms: Hugging Face model directories and distca
checkpoints.

A Hugging Face directory is ``config.json`` plus ``model.safetensors`` (or sharded
``model-XXXXX-of-YYYYY.safetensors`` with their index); a GGUF file (or a directory holding
one) is read through transformers, which dequantises it. Pickled ``pytorch_model.bin`` files are
refused: nothing is unpickled.

A distca checkpoint is the run-directory layout of :mod:`distca.train.checkpoint` with the
resolved ``config.yaml`` beside ``checkpoints/``; an import writes step 0 of a fresh run
directory (model only, no optimizer state), so ``distca train RUN/config.yaml
trainer.run_dir=RUN trainer.resume=true`` fine-tunes it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from distca.config import ConfigError, DistcaConfig, ModelConfig, load_config, validate
from distca.hf.config_map import HFFormatError, hf_config_from_model, model_config_from_hf
from distca.hf.weights import megatron_from_hf
from distca.model_source import gguf_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja",  # where transformers >= 4.5x saves the template
                   "generation_config.json")
TOKENIZER_DIR = "tokenizer"  # inside an imported run directory


def _read_gguf(file: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise HFFormatError(f"{file}: reading GGUF needs `pip install transformers gguf`") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name,
                                                     dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise HFFormatError(f"{file}: transformers cannot load it: {exc}") from exc
    hf = model.config.to_dict()
    hf["architectures"] = [type(model).__name__]
    return model_config_from_hf(hf, str(file)), dict(model.state_dict())


def _copy_tokenizer(path: Path, gguf: Path | None, out: Path) -> None:
    """The tokenizer of an HF directory (its files, if it has a ``tokenizer.json``) or of a
    GGUF file (as transformers saves it) into ``out``."""
    if gguf is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name) \
            .save_pretrained(str(out))
    elif (path / "tokenizer.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (path / name).is_file():
                shutil.copy2(path / name, out / name)


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise HFFormatError(f"{index}: weight_map: missing or not JSON") from exc
        if not (isinstance(weight_map, dict)
                and all(isinstance(name, str) for name in weight_map.values())):
            raise HFFormatError(f"{index}: weight_map: must map tensor names to file names")
        files = [directory / name for name in sorted(set(weight_map.values()))]
    elif (directory / "pytorch_model.bin").exists():
        raise HFFormatError(f"{directory / 'pytorch_model.bin'}: pickled weights are not "
                            f"loaded; convert them to safetensors first")
    else:
        raise HFFormatError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise HFFormatError(f"{file}: listed in the index but missing")
        try:
            state.update(load_file(str(file)))
        except SafetensorError as exc:  # a truncated download, an LFS pointer, ...
            raise HFFormatError(f"{file}: not a readable safetensors file ({exc})") from exc
    return state


def read_hf(path: str | Path, tokenizer_out: Path | None = None
            ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(model config, our megatron fp32 state dict) of an HF directory or GGUF file.

    When ``tokenizer_out`` is given, the source's tokenizer files are copied there, and only
    once the weights have converted: a refused input writes nothing.
    """
    path = Path(path)
    if not path.exists():
        raise HFFormatError(f"{path}: no such file or directory")
    gguf = gguf_file(path)
    if gguf is not None:
        m, hf_state = _read_gguf(gguf)
        source = str(gguf)
    else:
        config_file = path / "config.json"
        if not config_file.is_file():
            raise HFFormatError(f"{config_file}: missing (not a Hugging Face model directory)")
        try:
            hf = json.loads(config_file.read_text())
        except ValueError as exc:
            raise HFFormatError(f"{config_file}: not valid JSON: {exc}") from exc
        m = model_config_from_hf(hf, str(config_file))
        hf_state = _read_safetensors(path)
        source = str(path)
    state = megatron_from_hf(hf_state, m, source)
    if tokenizer_out is not None:
        _copy_tokenizer(path, gguf, tokenizer_out)
    return m, {k: v.float() for k, v in state.items()}


def write_hf(out: str | Path, m: ModelConfig, hf_state: dict[str, torch.Tensor],
             tokenizer_dir: Path | None = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` (fp32) and any tokenizer files."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config_from_model(m), indent=1) + "\n")
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in hf_state.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, out / name)


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run directory, step directory) of a run directory (its latest checkpoint) or a step
    directory ``RUN/checkpoints/step_N``."""
    from distca.train.checkpoint import DamagedCheckpoint, check_format, latest_checkpoint, verify

    path = Path(path)
    if not path.is_dir():
        raise HFFormatError(f"{path}: no such checkpoint directory")
    if (path / "checkpoints").is_dir():
        found = latest_checkpoint(path / "checkpoints")
        if found is None:
            raise HFFormatError(f"{path / 'checkpoints'}: no complete, undamaged checkpoint")
        try:
            check_format(found[0])
        except DamagedCheckpoint as exc:
            raise HFFormatError(str(exc)) from None
        return path, found[0]
    if any(path.glob("step_*")):
        raise HFFormatError(f"{path}: a directory of checkpoints; give the run directory "
                            f"{path.parent} (its newest checkpoint) or one of the step_* in it")
    try:
        verify(path)
        check_format(path)
    except DamagedCheckpoint as exc:
        raise HFFormatError(f"{path}: not a complete, undamaged checkpoint ({exc})") from None
    return path.parent.parent, path


def read_checkpoint(path: str | Path) -> tuple[DistcaConfig, dict[str, torch.Tensor], Path]:
    """(config, our whole-model megatron state dict, run directory) of a distca checkpoint of
    any layout: its tensors are stored whole (:mod:`distca.train.sharded_state`)."""
    from distca.train.checkpoint import DamagedCheckpoint
    from distca.train.sharded_state import read_whole

    run, step_dir = resolve_checkpoint(path)
    config_file = run / "config.yaml"
    if not config_file.is_file():
        raise HFFormatError(f"{config_file}: missing (the run's resolved config)")
    try:
        # the shape is saved in full: the run's own source need not exist any more
        cfg = load_config(config_file, ["model.init_from=null"])
    except ConfigError as exc:
        raise HFFormatError(str(exc)) from exc
    try:
        weights = read_whole(step_dir)
    except (DamagedCheckpoint, OSError) as exc:
        raise HFFormatError(str(exc)) from None
    return cfg, weights, run


def read_model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The whole-model fp32 megatron state dict of a ``model.init_from`` source
    (:mod:`distca.model_source`): a Hugging Face directory, a GGUF file or a distca checkpoint
    of any layout. Nothing is written, and the source is not changed."""
    from distca.model_source import source_shape

    kind, _, _ = source_shape(path)
    if kind == "checkpoint":
        return {k: v.float() for k, v in read_checkpoint(path)[1].items()}
    return read_hf(path)[1]


def write_checkpoint(out: str | Path, m: ModelConfig, state: dict[str, torch.Tensor],
                     origin: str, tokenizer_dir: Path | None = None) -> Path:
    """A fresh run directory at ``out`` whose step-0 checkpoint holds ``state``; returns the
    step directory. ``tokenizer_dir`` (if it holds a tokenizer) becomes ``data.tokenizer``."""
    from distca.train.checkpoint import begin_save, commit, rank_files
    from distca.train.run_dir import RunDir
    from distca.train.sharded_state import write_whole

    cfg = DistcaConfig(model=m)
    cfg.trainer.run_dir = str(out)
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file():
        cfg.data.tokenizer = str(tokenizer_dir.resolve())
    validate(cfg, str(out))
    run = RunDir(out)
    run.write_config(cfg)
    tmp = begin_save(run.checkpoints, 0)
    write_whole(tmp, state)
    return commit(tmp, 0, {"restarts": 0, "data_position": 0, "seed": cfg.trainer.seed,
                           "imported_from": origin}, rank_files(tmp, 0))
