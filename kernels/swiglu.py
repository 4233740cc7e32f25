"""Triton kernels for SwiGLU, out = silu(gate) * up, elementwise: fp32 arithmetic on fp32 or bf16 storage."""
import triton
import triton.language as tl


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))  # never overflows
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _forward_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = k < n
    g = tl.load(g_ptr + k, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + k, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + k, (g * _sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(g_ptr, u_ptr, dy_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = k < n
    g = tl.load(g_ptr + k, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + k, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + k, mask=mask, other=0.0).to(tl.float32)
    s = _sigmoid(g)
    tl.store(du_ptr + k, (dy * g * s).to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + k, (dy * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=mask)


def _grid(n, block):
    return (triton.cdiv(n, block),)


def swiglu_forward(gate, up, out):
    n = gate.numel()
    block = 1024 if gate.is_cuda else 256
    if n:
        _forward_kernel[_grid(n, block)](gate, up, out, n, BLOCK=block)


def swiglu_backward(gate, up, grad_out, grad_gate, grad_up):
    n = gate.numel()
    block = 1024 if gate.is_cuda else 256
    if n:
        _backward_kernel[_grid(n, block)](gate, up, grad_out, grad_gate, grad_up, n, BLOCK=block)
