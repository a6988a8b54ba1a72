"""The step's micro-batches from the configured source."""

from __future__ import annotations

from distca.batch import PackedBatch
from distca.config import AttentionMask, DataKind, DistcaConfig, chat_mask
from distca.data.chat import ChatData
from distca.data.packing import join_packs
from distca.data.synth_chat import synth_chat_data
from distca.data.synthetic import SyntheticData
from distca.data.text import TextData, expand_paths
from distca.data.tokenizer import load_tokenizer


class Dataset:
    """The micro-batches of step ``s`` (1-based): packs ``(s-1)*P .. s*P-1`` of the source, ``P``
    packs a step, laid side by side ``K`` to a micro-batch (``K = R*T / pack_tokens``). A pack
    is a pure function of the source, the seed and its index, so the step's tokens depend on
    the global batch ``R*T*M`` and ``pack_tokens`` only, not on how they are split over ranks
    and micro-batches. The data position saved in a checkpoint is just the step."""

    def __init__(self, source: SyntheticData | TextData | ChatData, num_ranks: int,
                 tokens_per_rank: int, micro_batches: int, pack_tokens: int | None = None):
        self.source = source
        self.num_ranks = num_ranks
        self.tokens_per_rank = tokens_per_rank
        self.micro_batches = micro_batches
        self.pack_tokens = pack_tokens or num_ranks * tokens_per_rank
        self.packs_per_micro_batch = num_ranks * tokens_per_rank // self.pack_tokens

    @property
    def skipped_rows(self) -> int:
        """Malformed rows dropped under ``data.skip_bad_rows=true`` (synthetic data has none)."""
        return getattr(self.source, "skipped_rows", 0)

    def step_batches(self, step: int) -> list[PackedBatch]:
        k = self.packs_per_micro_batch
        first = (step - 1) * self.micro_batches * k
        if k == 1:  # a pack is the micro-batch
            return [self.source.micro_batch(first + m, self.num_ranks, self.tokens_per_rank)
                    for m in range(self.micro_batches)]
        return [join_packs([self.source.micro_batch(first + m * k + j, 1, self.pack_tokens)
                            for j in range(k)], self.tokens_per_rank)
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
    dataset = Dataset(source, cfg.parallel.dp, d.tokens_per_rank, d.micro_batches,
                      d.pack_tokens)
    # build one step now: data that cannot fill a micro-batch (a conversation longer than
    # one) fails here, in the driver before Ray starts, not in the first training step
    dataset.step_batches(1)
    return dataset
