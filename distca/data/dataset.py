"""The step's micro-batches from the configured source."""

from __future__ import annotations

from distca.batch import PackedBatch
from distca.config import AttentionMask, DataKind, DistcaConfig, chat_mask
from distca.data.chat import ChatData
from distca.data.synth_chat import synth_chat_data
from distca.data.synthetic import SyntheticData
from distca.data.text import TextData, expand_paths
from distca.data.tokenizer import load_tokenizer


class Dataset:
    """Micro-batches for step ``s`` (1-based) are global micro-batch indices
    ``(s-1)*M .. s*M-1``; the data position saved in a checkpoint is just the step."""

    def __init__(self, source: SyntheticData | TextData | ChatData, num_ranks: int,
                 tokens_per_rank: int, micro_batches: int):
        self.source = source
        self.num_ranks = num_ranks
        self.tokens_per_rank = tokens_per_rank
        self.micro_batches = micro_batches

    @property
    def skipped_rows(self) -> int:
        """Malformed rows dropped under ``data.skip_bad_rows=true`` (synthetic data has none)."""
        return getattr(self.source, "skipped_rows", 0)

    def step_batches(self, step: int) -> list[PackedBatch]:
        first = (step - 1) * self.micro_batches
        return [self.source.micro_batch(first + m, self.num_ranks, self.tokens_per_rank)
                for m in range(self.micro_batches)]


def make_dataset(cfg: DistcaConfig, eval_data: bool = False) -> Dataset:
    """Build the configured data source (``data.eval_paths`` with ``eval_data``); a missing file
    or tokenizer, or data that cannot make a micro-batch, raises naming the path or key."""
    d = cfg.data
    key = "data.eval_paths" if eval_data else "data.paths"
    if d.kind is DataKind.synthetic:
        source = SyntheticData(d.distribution, d.max_length, cfg.model.vocab_size,
                               cfg.trainer.seed)
    else:
        tokenizer = load_tokenizer(d.tokenizer)
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise ValueError(f"data.tokenizer: {tokenizer.name} has {tokenizer.vocab_size} "
                             f"tokens, more than model.vocab_size={cfg.model.vocab_size}")
        paths = expand_paths(d.eval_paths if eval_data else d.paths, key)
        turns = chat_mask(cfg) is AttentionMask.glm  # the GLM mask is expressed through turns
        if d.kind is DataKind.synth and not eval_data:
            source = synth_chat_data(cfg, tokenizer, turns)
        elif d.kind is DataKind.text:
            source = TextData(paths, tokenizer, d.max_length, cfg.trainer.seed, d.skip_bad_rows)
        else:  # chat files; validation data of synthetic chat tasks is chat files too
            source = ChatData(paths, tokenizer, d.tokenizer, d.max_length, cfg.trainer.seed,
                              d.skip_bad_rows, turns=turns)
    dataset = Dataset(source, cfg.parallel.dp, d.tokens_per_rank, d.micro_batches)
    # build one step now: data that cannot fill a micro-batch (a conversation longer than
    # one) fails here, in the driver before Ray starts, not in the first training step
    dataset.step_batches(1)
    return dataset
