"""Backend choice, the cpp build cache, varlen packing, and the GPU backends (marked gpu)."""

import warnings
from pathlib import Path

import pytest
import torch
from attention_reference import dense_attention
from distca.parallel.dispatch import merge_partials
from emulated_gpu_backends import EMULATED, emulate, gpu_backend_for
from test_attention_core import (
    GPU_BACKENDS,
    check,
    fresh_seed,
    random_layout,
    rel_err,
    split_tasks,
)

from distca.attention import (
    attention_forward,
    core,
    cpp_backend,
    flash_backend,
    flex_backend,
    make_task_list,
)
from distca.attention.packing import pack_tasks
from distca.attention.tasks import causal_document_tasks, multiturn_tasks, task_mask

GLM = [[(9, True), (6, False), (1, True), (12, False)], [(1, True)], [(20, True), (17, False)]]


def test_auto_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.setattr(cpp_backend, "_load", lambda: (None, "no C++ compiler found ('c++')"))
    core._warn_cpp_fallback.cache_clear()
    tasks = causal_document_tasks([5, 7])
    q = torch.randn(12, 2, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = core.core_attention(q, q, q, tasks, None, None)
        core.core_attention(q, q, q, tasks, None, None)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no C++ compiler" in messages[0] and "'torch'" in messages[0]
    ref, _ = core.core_attention(q, q, q, tasks, None, None, backend="torch")
    assert torch.equal(out, ref)
    with pytest.raises(RuntimeError, match="'cpp' is not available: no C\\+\\+ compiler"):
        core.core_attention(q, q, q, tasks, None, None, backend="cpp")
    core._warn_cpp_fallback.cache_clear()


def test_cpp_kernel_is_the_extension_built_at_install(cpp_extension):
    """The kernel is distca._C from the install (setup.py), not a JIT build under build/ that
    a changed PATH or a copied working directory would redo."""
    from distca.attention.kernel_source import sources_digest

    module = cpp_backend._load()[0]
    assert module.__name__ == "distca._C" and "build/extensions" not in module.__file__
    assert module.SOURCES_DIGEST == sources_digest(cpp_backend._ROOT)


def test_missing_kernel_names_the_missing_compiler_or_how_to_build(monkeypatch):
    def not_built(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(cpp_backend.importlib, "import_module", not_built)
    monkeypatch.setattr(cpp_backend, "_installed_kernel", lambda: None)
    try:
        for cxx, reason in (("/nonexistent/c++", "no C++ compiler found"),
                            ("c++", "is not built")):
            monkeypatch.setenv("CXX", cxx)
            cpp_backend._load.cache_clear()
            assert reason in cpp_backend.unavailable_reason()
    finally:
        cpp_backend._load.cache_clear()


def test_a_copy_of_the_sources_without_the_kernel_uses_the_installed_one(tmp_path,
                                                                        cpp_extension):
    """`ray job submit --working-dir` uploads the checkout without git-ignored files (the
    built kernel): the job's copy used to compile the kernel again."""
    import shutil
    import subprocess
    import sys

    root = cpp_backend._ROOT
    shutil.copytree(root / "distca", tmp_path / "distca", ignore=shutil.ignore_patterns("*.so"))
    shutil.copytree(root / "csrc", tmp_path / "csrc")
    probe = ("from distca.attention import cpp_backend as c; import distca; "
             "print(distca.__file__, c.is_available(), c._load()[0].__file__)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                         text=True, check=True, timeout=300).stdout.split()
    assert out[0] == str(tmp_path / "distca" / "__init__.py") and out[1] == "True"
    assert out[2] == str(root / "distca" / Path(out[2]).name)


def test_stale_cpp_kernel_is_refused_with_how_to_rebuild(monkeypatch, cpp_extension):
    monkeypatch.setattr(cpp_backend, "_checkout_digest", lambda: "0" * 16)
    cpp_backend._load.cache_clear()
    try:
        assert not cpp_backend.is_available()
        assert "other csrc/ sources" in cpp_backend.unavailable_reason()
        assert "make setup" in cpp_backend.unavailable_reason()
    finally:
        cpp_backend._load.cache_clear()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_cpu_only_machine_names_missing_gpu_backend():
    q = torch.randn(4, 1, 8)
    with pytest.raises(RuntimeError, match="'flex' is not available: no CUDA device"):
        core.core_attention(q, q, q, causal_document_tasks([4]), None, None, backend="flex")


def test_packed_batches_merge_like_the_torch_backend():
    """The GPU backends' pack -> per-batch attention -> LSE merge path, run on the CPU."""
    tasks = multiturn_tasks(GLM)
    q, k, v = (torch.randn(tasks.num_q, 2, 16) for _ in range(3))
    parts = []
    for batch in pack_tasks(tasks.rows, "cpu"):
        starts_q, starts_kv = batch.cu_q.tolist(), batch.cu_kv.tolist()
        rows = [(starts_q[i], starts_q[i + 1], starts_kv[i], starts_kv[i + 1], batch.causal)
                for i in range(len(starts_q) - 1)]
        packed = make_task_list(*split_tasks(rows), len(batch.q_index), len(batch.kv_index))
        out, lse = attention_forward(q[batch.q_index], k[batch.kv_index], v[batch.kv_index],
                                     packed, None, None, backend="torch")
        parts.append((batch.q_index, out, lse))
    assert {b.causal for b in pack_tasks(tasks.rows, "cpu")} == {True, False}
    out, lse = merge_partials(torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]),
                              torch.cat([p[0] for p in parts]), tasks.num_q)
    ref_out, ref_lse = attention_forward(q, k, v, tasks, None, None, backend="torch")
    assert rel_err(out, ref_out) < 1e-6 and rel_err(lse, ref_lse) < 1e-6


@pytest.fixture
def gpu_backend(request):
    return gpu_backend_for(request.param, request)


@pytest.mark.parametrize("gpu_backend", [
    *(pytest.param(b, marks=pytest.mark.gpu) for b in GPU_BACKENDS),
    *(pytest.param(name, marks=pytest.mark.slow) for name in EMULATED)], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_backends_many_blocks(gpu_backend, dtype):
    """16-bit GPU kernels over layouts spanning many 128-token blocks, head dim 64 and 128."""
    check(gpu_backend, causal_document_tasks([1, 900, 130, 2, 1000]), heads=4, kv_heads=2,
          dim=64, dtype=dtype)
    check(gpu_backend, multiturn_tasks([[(300, True), (260, False), (1, True), (200, False)],
                                        [(700, True), (129, False)]]),
          heads=8, kv_heads=2, dim=128, dtype=dtype)


def test_flex_block_grid_is_exact_at_block_level():
    """Blocks claimed full see every pair; every visible pair lies in a claimed block.

    Runs on the CPU: the grid is what lets flex skip the per-pair mask on full blocks, so a
    wrong "full" would silently widen the mask on the GPU.
    """
    block = flex_backend.BLOCK
    gen = torch.Generator().manual_seed(fresh_seed())
    layouts = [causal_document_tasks([700, 1, 300]), multiturn_tasks([[(300, True), (260, False),
                                                                       (200, True)]]),
               make_task_list(*split_tasks([(0, 300, 0, 300, True), (300, 600, 0, 250, False),
                                            (300, 600, 250, 600, True)]), 600, 600)]
    for _ in range(10):
        rows, n = random_layout(gen)
        rows = [(a * 5, b * 5, c * 5, d * 5, m) for a, b, c, d, m in rows]  # span several blocks
        layouts.append(make_task_list(*split_tasks(rows), n * 5, n * 5))
    for tasks in layouts:
        nqb = flex_backend.padded_length(tasks.num_q) // block
        nkb = flex_backend.padded_length(tasks.num_kv) // block
        grid = torch.from_numpy(flex_backend.block_grid(tasks, nqb, nkb))
        mask = torch.zeros(nqb * block, nkb * block, dtype=torch.bool)
        mask[: tasks.num_q, : tasks.num_kv] = task_mask(tasks)
        blocks = mask.view(nqb, block, nkb, block)
        visible_any, visible_all = blocks.any(3).any(1), blocks.all(3).all(1)
        assert torch.all(visible_all[grid == 2]), "a block claimed full hides some pair"
        assert torch.all(grid[visible_any] > 0), "a visible pair lies in an empty block"
        if tasks is layouts[0]:  # one task per row: every fully visible block is claimed full
            assert int((grid == 2).sum()) == int(visible_all.sum()) > 0


def test_flex_compiles_once_per_token_bucket(monkeypatch):
    """Token counts inside one padded bucket reuse the compiled graph, with and without grad.

    Dynamo's guards decide this whatever compiles the graph; its ``eager`` backend shows them
    on the CPU. Each call brings a new TaskList, so a new block mask and ``mask_mod``."""
    from torch._dynamo.utils import counters

    emulate("flex-eager@cpu", monkeypatch)
    compiled = torch.compile(flex_backend._attention, dynamic=False, backend="eager")
    monkeypatch.setattr(flex_backend, "_compiled_attention", lambda: compiled)
    gen = torch.Generator().manual_seed(fresh_seed())
    sinks = torch.randn(2, generator=gen, requires_grad=True)
    before, graphs = counters["stats"]["unique_graphs"], []
    for n in (200, 201, 230, 256, 300):
        tasks = causal_document_tasks([n - 50, 50])
        q, k, v = (torch.randn(n, 2, 16, generator=gen, requires_grad=True) for _ in range(3))
        out, lse = core.core_attention(q, k, v, tasks, None, None, sinks=sinks, backend="flex")
        out.sum().backward()
        with torch.no_grad():
            core.core_attention(q, k, v, tasks, None, None, sinks=sinks, backend="flex")
        graphs.append(counters["stats"]["unique_graphs"] - before)
        ref, ref_lse = dense_attention(q, k, v, task_mask(tasks), sinks)
        assert rel_err(out, ref) < 1e-5 and rel_err(lse, ref_lse) < 1e-5
    assert graphs[0] > 0 and graphs[:4] == graphs[:1] * 4 and graphs[4] > graphs[3], graphs


@pytest.mark.parametrize("name,module,builder", [
    ("flash-2.6@cpu", flash_backend, "pack_tasks"),
    ("flex-eager@cpu", flex_backend, "_build_block_mask")])
def test_gpu_backends_derive_task_metadata_once(monkeypatch, name, module, builder):
    """Forward and backward (with an lse gradient: two flash passes) share one packing or block
    mask: each build copies index tensors to the device."""
    emulate(name, monkeypatch)
    real, calls = getattr(module, builder), []
    monkeypatch.setattr(module, builder, lambda *args: calls.append(args) or real(*args))
    tasks = multiturn_tasks(GLM)
    q = torch.randn(tasks.num_q, 2, 8, requires_grad=True)
    out, lse = core.core_attention(q, q, q, tasks, None, None, backend=EMULATED[name])
    (out.sum() + lse.nan_to_num(0.0, neginf=0.0).sum()).backward()
    assert len(calls) == 1 and q.grad is not None
