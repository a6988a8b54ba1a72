"""Model-side sink parameter and output gate helpers."""

import pytest
import torch

from distca.attention import apply_gate, core_attention, make_sinks, split_query_and_gate
from distca.attention.reference import causal_document_tasks


def test_sinks_parameter_trains_through_core_attention():
    sinks = make_sinks(4, init=0.5)
    assert sinks.shape == (4,) and sinks.dtype == torch.float32 and sinks.requires_grad
    q = torch.randn(10, 4, 8)
    out, _ = core_attention(q, q[:, :2], q[:, :2], causal_document_tasks([10]), None, None,
                            sinks=sinks)
    out.sum().backward()
    assert sinks.grad is not None and torch.all(sinks.grad != 0)


def test_gate_split_and_apply():
    n, heads, dim = 5, 3, 4
    projected = torch.randn(n, heads * 2 * dim)
    query, gate = split_query_and_gate(projected, heads, dim)
    assert query.shape == gate.shape == (n, heads, dim)
    assert torch.equal(query[1, 2], projected[1, 2 * 2 * dim: 2 * 2 * dim + dim])
    attn = torch.randn(n, heads, dim)
    assert torch.allclose(apply_gate(attn, gate), attn * torch.sigmoid(gate))
    with pytest.raises(ValueError, match="expected 24"):
        split_query_and_gate(projected[:, :-1], heads, dim)
    with pytest.raises(ValueError, match="gate shape"):
        apply_gate(attn, gate[:, :2])
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        make_sinks(0)
