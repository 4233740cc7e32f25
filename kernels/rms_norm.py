"""Triton kernels for RMSNorm: one program per row forward; backward in blocks of rows, each program writing
one partial row of d(weight) that the caller sums in a fixed order (deterministic, no atomics).

Storage may be fp32 or bf16 for x, y, dy and dx independently; the arithmetic is fp32.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, d, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < d
    x = tl.load(x_ptr + row * d + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / d + eps)
    tl.store(rstd_ptr + row, s)
    tl.store(y_ptr + row * d + cols, (x * s * w).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(x_ptr, w_ptr, rstd_ptr, dy_ptr, dx_ptr, dw_partial_ptr, rows, d, ROWS_PER_PROGRAM: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    block = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < d
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(ROWS_PER_PROGRAM):
        row = block * ROWS_PER_PROGRAM + i
        m = cols < tl.where(row < rows, d, 0)  # a past-the-end row of the last block reads and writes nothing
        x = tl.load(x_ptr + row * d + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * d + cols, mask=m, other=0.0).to(tl.float32)
        s = tl.load(rstd_ptr + row, mask=row < rows, other=0.0)
        xhat = x * s
        dw += dy * xhat
        c = tl.sum(dy * w * xhat, axis=0) / d
        tl.store(dx_ptr + row * d + cols, (s * (dy * w - xhat * c)).to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(dw_partial_ptr + block * d + cols, dw, mask=mask)


def rms_norm_forward(x, weight, eps, y, rstd):
    rows, d = x.shape
    if rows:
        _forward_kernel[(rows,)](x, weight, y, rstd, d, eps, BLOCK_D=triton.next_power_of_2(d))


def rms_norm_backward(x, weight, rstd, grad_y, grad_x, grad_weight, rows_per_program: int = 32):
    rows, d = x.shape
    blocks = triton.cdiv(rows, rows_per_program)
    partial = torch.zeros(max(blocks, 1), d, dtype=torch.float32, device=x.device)
    if rows:
        _backward_kernel[(blocks,)](x, weight, rstd, grad_y, grad_x, partial, rows, d,
                                    ROWS_PER_PROGRAM=rows_per_program, BLOCK_D=triton.next_power_of_2(d))
    torch.sum(partial, dim=0, out=grad_weight)
