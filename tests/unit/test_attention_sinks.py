"""The learnable sink parameter."""

import pytest
import torch

from distca.attention import core_attention, make_sinks
from distca.attention.tasks import causal_document_tasks


def test_sinks_parameter_trains_through_core_attention():
    sinks = make_sinks(4, init=0.5)
    assert sinks.shape == (4,) and sinks.dtype == torch.float32 and sinks.requires_grad
    q = torch.randn(10, 4, 8)
    out, _ = core_attention(q, q[:, :2], q[:, :2], causal_document_tasks([10]), None, None,
                            sinks=sinks)
    out.sum().backward()
    assert sinks.grad is not None and torch.all(sinks.grad != 0)


def test_sinks_need_a_head():
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        make_sinks(0)
