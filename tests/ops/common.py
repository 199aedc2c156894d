"""Parameters and tolerances shared by the op tests."""

from __future__ import annotations

import pytest
import torch

GPU = pytest.mark.gpu

# (device, dtype): fp32/bf16 on CPU, fp16 too on CUDA.
DEVICE_DTYPES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float32, id="cuda-fp32", marks=GPU),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=GPU),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=GPU),
]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=GPU)]
CUDA_DTYPES = [pytest.param(d, id=str(d).removeprefix("torch."), marks=GPU)
               for d in (torch.float32, torch.bfloat16, torch.float16)]

_TOL = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
}


def tol(dtype: torch.dtype, scale: float = 1.0) -> dict[str, float]:
    """assert_close tolerances for kernel-vs-reference in `dtype` (scaled for long reductions)."""
    return {k: v * scale for k, v in _TOL[dtype].items()}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    torch.testing.assert_close(actual.cpu(), expected.cpu(), **tol(dtype, scale))


def raises(device: str, pattern: str):
    """A RuntimeError for bad input; the message is pinned for the CPU kernels only."""
    return pytest.raises(RuntimeError, match=pattern if device == "cpu" else None)


def assert_graph_replay_equals_eager(step, change) -> None:
    """Capture `step()` (after one eager warm-up call) in a CUDA graph, `change()` its inputs in
    place, replay it, and ask that its outputs equal a new eager `step()` bit for bit."""
    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    change()
    graph.replay()
    captured = captured if isinstance(captured, tuple) else (captured,)
    eager = step()
    for got, want in zip(captured, eager if isinstance(eager, tuple) else (eager,), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
