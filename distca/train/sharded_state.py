"""Each rank's share of the training state as pieces of whole-model tensors, saved and loaded
with ``torch.distributed.checkpoint`` (DCP), so that a checkpoint does not depend on the layout.

A checkpoint stores every tensor whole, under its TP=1/PP=1 name
(:func:`distca.model.sharding.global_name`); each rank writes the rectangles of it that it
holds, and on load asks for the rectangles it needs in *its* layout. DCP matches the two (any
dp, tp, pp, number of dedicated servers or micro-batch split), and checks on save that the
rectangles of all ranks cover every tensor exactly once. Keys:

``model/<name>``          the weights in the run's dtype; written by the first data-parallel copy
``master/<name>``         fp32 master weights, only when the model is not fp32 (ZeRO owner)
``exp_avg/<name>``, ``exp_avg_sq/<name>``   AdamW's moments, fp32 (ZeRO owner)
``optim_step``            AdamW's step count

Where a rank's tensor is not a plain slice of the whole one, the rectangles say so: ZeRO
slices are ranges of a tensor's flattened elements (up to three rectangles each: a partial
first row, whole rows, a partial last row); a gated ``linear_fc1`` holds ``[gate_t; up_t]``,
two row ranges of the whole ``[gate; up]``; the last pipeline stage's copy of a tied embedding
reads the embedding's key and writes nothing. Dedicated servers hold no state.

On load, master weights and moments come from the checkpoint and the model's weights are
rounded from the master weights, as after every optimizer step (an fp32 checkpoint read by a
bf16 run gives its fp32 weights to the master copies). DCP's ``.metadata`` file is a pickle:
load only checkpoints you trust (their sha256 digests are checked against the manifest first).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from distca.model.sharding import global_name
from distca.train.checkpoint import DamagedCheckpoint

Rectangle = tuple[int, int, tuple[int, ...], tuple[int, ...]]  # flat lo, hi, offsets, sizes
MOMENTS = ("exp_avg", "exp_avg_sq")


def flat_rectangles(shape: tuple[int, ...], lo: int, hi: int) -> list[Rectangle]:
    """Rectangles covering flat elements ``[lo, hi)`` of a row-major tensor of ``shape``
    (1-D or 2-D), in order: ``(flat lo, flat hi, offsets, sizes)``."""
    if len(shape) == 1:
        return [(lo, hi, (lo,), (hi - lo,))] if hi > lo else []
    if len(shape) != 2:
        raise ValueError(f"tensors of shape {tuple(shape)} are not supported (1-D or 2-D)")
    cols = shape[1]
    out, at = [], lo
    if at % cols and at < hi:  # a partial first row
        end = min(hi, (at // cols + 1) * cols)
        out.append((at, end, (at // cols, at % cols), (1, end - at)))
        at = end
    rows = (hi - at) // cols
    if rows:
        out.append((at, at + rows * cols, (at // cols, 0), (rows, cols)))
        at += rows * cols
    if at < hi:  # a partial last row
        out.append((at, hi, (at // cols, 0), (1, hi - at)))
    return out


@dataclass(frozen=True)
class Placement:
    """Where a rank's local tensor lies in the whole tensor ``key`` of shape ``whole``."""

    key: str
    local: tuple[int, ...]  # the local tensor's shape
    whole: tuple[int, ...]
    dim: int | None  # the tensor-parallel split dimension (None: replicated)
    start: int  # this rank's first index on ``dim`` (of each half, for a gated fc1)
    glu_half: int = 0  # local rows of each of gate and up in a gated linear_fc1 (else 0)
    copy: bool = False  # a tied embedding's second copy: read, never written

    def to_whole(self, offsets: tuple[int, ...], block: torch.Tensor):
        """``[(whole offsets, block part)]`` of a local rectangle at ``offsets``."""
        if self.glu_half:
            h, r0, n = self.glu_half, offsets[0], block.shape[0]
            cut = min(max(h - r0, 0), n)  # rows of the block in the gate half
            parts = []
            if cut:
                parts.append(((self.start + r0, *offsets[1:]), block[:cut]))
            if cut < n:
                up_row = self.whole[0] // 2 + self.start + r0 + cut - h
                parts.append(((up_row, *offsets[1:]), block[cut:]))
            return parts
        if self.dim is None:
            return [(tuple(offsets), block)]
        moved = list(offsets)
        moved[self.dim] += self.start
        return [(tuple(moved), block)]

    def pieces(self, flat: torch.Tensor, lo: int, hi: int):
        """``[(whole offsets, view)]`` of ``flat`` (1-D, the local elements ``[lo, hi)``)."""
        out = []
        for a, b, offsets, sizes in flat_rectangles(self.local, lo, hi):
            out += self.to_whole(offsets, flat[a - lo:b - lo].view(sizes))
        return out


def placement(name: str, param: torch.nn.Parameter, layer_offset: int, tp_rank: int, tp: int,
              glu: bool, tied_copy: bool) -> Placement:
    """The :class:`Placement` of a megatron stage's parameter ``name`` (local name)."""
    local = tuple(param.shape)
    key = "embedding.word_embeddings.weight" if tied_copy else global_name(name, layer_offset)
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return Placement(key, local, local, None, 0, copy=tied_copy)
    dim = param.partition_dim
    whole = tuple(n * tp if d == dim else n for d, n in enumerate(local))
    if glu and ".mlp.linear_fc1." in name:
        half = local[0] // 2
        return Placement(key, local, whole, 0, tp_rank * half, half, tied_copy)
    return Placement(key, local, whole, dim, tp_rank * local[dim], copy=tied_copy)


class Chunks:
    """A rank's rectangles of one whole tensor, in DCP's checkpointable protocol (what DTensor
    implements): the write items, the chunk list and the tensor of each chunk."""

    def __init__(self, whole: tuple[int, ...]) -> None:
        self.whole = torch.Size(whole)
        self.parts: dict[tuple[int, ...], torch.Tensor] = {}

    def add(self, offsets: tuple[int, ...], tensor: torch.Tensor) -> None:
        if tensor.numel():
            self.parts[tuple(offsets)] = tensor

    def size(self) -> torch.Size:
        return self.whole

    def __create_write_items__(self, fqn: str, obj) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(offsets)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(torch.Size(offsets), t.shape),
                              properties=TensorProperties.create_from_tensor(t), size=self.whole))
                for offsets, t in self.parts.items()]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(torch.Size(o), t.shape) for o, t in self.parts.items()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self.parts[tuple(index.offset)]


class _SavePlanner(DefaultSavePlanner):
    """DCP's planner, finding the tensor of a :class:`Chunks` piece by its offsets (the
    default looks up by offset in ``torch.Tensor`` subclasses only)."""

    def lookup_object(self, index: MetadataIndex):
        found = self.state_dict.get(index.fqn)
        if isinstance(found, Chunks):
            return found.__get_tensor_shard__(index)
        return super().lookup_object(index)


class _LoadPlanner(DefaultLoadPlanner):
    """The load side of :class:`_SavePlanner`. The state is flat already, and DCP's default
    set-up would replace every value that is not a tensor type it knows by None."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.original_state_dict = self.state_dict = state_dict
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        found = self.state_dict.get(index.fqn)
        if isinstance(found, Chunks):
            return found.__get_tensor_shard__(index)
        return super().lookup_tensor(index)


class _State:
    """Key -> :class:`Chunks`, built from placements."""

    def __init__(self) -> None:
        self.items: dict[str, Chunks] = {}

    def add(self, prefix: str, place: Placement, flat: torch.Tensor, lo: int, hi: int,
            to_cpu: bool) -> None:
        chunks = self.items.setdefault(f"{prefix}/{place.key}", Chunks(place.whole))
        for offsets, view in place.pieces(flat, lo, hi):
            chunks.add(offsets, view.detach().cpu().clone() if to_cpu else view)


def _placements(role) -> list[Placement]:
    m, model = role.mesh, role.model
    glu = model.config.gated_linear_unit
    out = []
    for name, param in model.named_parameters():
        tied_copy = role.tied is not None and not m.is_first_stage and param is role.tied
        out.append(placement(name, param, role.layer_offset, m.tp_rank, m.tp, glu, tied_copy))
    return out


def _optimizer_parts(role):
    """``(placement, stepped tensor, AdamW state, master or None, lo, hi)`` per stepped piece."""
    opt = role.optimizer
    places = [p for p, q in zip(_placements(role), role.model.parameters()) if q.requires_grad]
    for j, (i, lo, hi) in enumerate(opt.pieces):
        stepped = opt.stepped[j]
        yield places[i], stepped, opt.adamw.state.get(stepped, {}), \
            (opt.master[j] if opt.master is not None else None), lo, hi


def save_state(role, directory: Path) -> None:
    """Write this rank's share of the training state into ``directory`` (collective over
    every rank: call it on all of them, dedicated servers included)."""
    from torch.distributed.checkpoint import FileSystemWriter

    state = _State()
    if role.holds_weights:
        if role.mesh.dp_rank == 0:
            for place, (_, param) in zip(_placements(role), role.model.named_parameters()):
                if not place.copy:
                    state.add("model", place, param.detach().reshape(-1), 0, param.numel(), True)
        low_precision = any(q.dtype != torch.float32 for q in role.params)
        step = None
        for place, _, adam, master, lo, hi in _optimizer_parts(role):
            if place.copy:
                continue
            if master is not None and low_precision:
                state.add("master", place, master.reshape(-1), lo, hi, True)
            for moment in MOMENTS:
                if moment in adam:
                    state.add(moment, place, adam[moment].reshape(-1), lo, hi, True)
            step = adam.get("step", step)
        items: dict = dict(state.items)
        if step is not None:
            items["optim_step"] = torch.as_tensor(step, dtype=torch.float32).clone()
    else:
        items = {}
    with _named(directory, "write"):
        dcp.save(items, storage_writer=FileSystemWriter(str(directory), sync_files=True),
                 planner=_SavePlanner())


def checkpoint_keys(step_dir: Path) -> set[str]:
    """The keys a DCP checkpoint holds (reads its ``.metadata``)."""
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata)


def load_state(role, step_dir: Path) -> None:
    """Load this rank's share of the training state saved by :func:`save_state` in any layout
    (collective over every rank). A checkpoint without optimizer state (an import) leaves the
    optimizer fresh."""
    from torch.distributed.checkpoint import FileSystemReader

    items: dict = {}
    if role.holds_weights:
        keys = checkpoint_keys(step_dir)
        weights = "master" if any(k.startswith("master/") for k in keys) else "model"
        opt = role.optimizer
        has_moments = any(k.startswith("exp_avg/") for k in keys)
        state = _State()
        trainable = {id(q) for q in role.params}
        for place, (_, param) in zip(_placements(role), role.model.named_parameters()):
            if opt.master is None or id(param) not in trainable:  # loaded into the weights
                state.add(weights, place, param.data.reshape(-1), 0, param.numel(), False)
        for place, stepped, _, master, lo, hi in _optimizer_parts(role):
            # the stepped tensor holds the local elements [lo, hi): a ZeRO slice of master
            # weights, or the whole parameter when stepped in place
            if master is not None:
                state.add(weights, place, master.data.reshape(-1), lo, hi, False)
            if has_moments:
                adam = opt.adamw.state[stepped] = {
                    "step": torch.zeros((), dtype=torch.float32),
                    **{m: torch.zeros_like(stepped, memory_format=torch.contiguous_format)
                       for m in MOMENTS}}
                for moment in MOMENTS:
                    state.add(moment, place, adam[moment].reshape(-1), lo, hi, False)
        items = dict(state.items)
        if has_moments:
            items["optim_step"] = torch.zeros((), dtype=torch.float32)
    with _named(step_dir, "read"):
        dcp.load(items, storage_reader=FileSystemReader(str(step_dir)), planner=_LoadPlanner())
    if role.holds_weights:
        if "optim_step" in items:
            for adam in role.optimizer.adamw.state.values():
                adam["step"] = items["optim_step"].clone()
        if role.optimizer.master is not None:
            role.optimizer.write_back()  # the weights from the master copies


def read_whole(step_dir: Path, prefix: str = "model") -> dict[str, torch.Tensor]:
    """Every ``prefix/`` tensor of a checkpoint, whole, by model name (one process, no
    collectives: for export and ``model.init_from``)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(step_dir))
    meta = reader.read_metadata().state_dict_metadata
    items = {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in meta.items()
             if k.startswith(prefix + "/") and isinstance(md, TensorStorageMetadata)}
    with _one_process(), _named(step_dir, "read"):
        dcp.load(items, storage_reader=reader, no_dist=True)
    return {k[len(prefix) + 1:]: v for k, v in items.items()}


def write_whole(directory: Path, weights: dict[str, torch.Tensor]) -> None:
    """A checkpoint of whole weights and no optimizer state (one process: ``import-hf``)."""
    from torch.distributed.checkpoint import FileSystemWriter

    with _one_process(), _named(directory, "write"):
        dcp.save({f"model/{k}": v.detach().cpu() for k, v in weights.items()},
                 storage_writer=FileSystemWriter(str(directory), sync_files=True), no_dist=True)


@contextmanager
def _named(directory: Path, verb: str):
    """DCP's failures (a ``BaseException``, which would kill a Ray worker rather than reach
    the driver as an error) as a :class:`DamagedCheckpoint` naming the directory."""
    try:
        yield
    except CheckpointException as exc:
        why = "; ".join(f"rank {rank}: {type(error).__name__}: {error}"
                        for rank, (error, _) in sorted(exc.failures.items()))
        raise DamagedCheckpoint(f"cannot {verb} checkpoint {directory} ({why})") from None


@contextmanager
def _one_process():
    """DCP without collectives, on purpose: its warning that it assumes so is not for users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
