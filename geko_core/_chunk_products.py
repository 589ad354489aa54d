"""The matrix products of the chunk loops (``_linear_chunks``, ``_logprob_chunks``), in one place.

A chunk loop multiplies three times per chunk: the logits ``hidden @ W.T``, the hidden states'
gradient ``G @ W`` and the head weight's gradient ``G.T @ hidden``. On a GPU, or a CPU with
16-bit matrix instructions (AVX-512 BF16, AMX, AVX-512 FP16), they run in the inputs' dtype. A
CPU without them runs torch's bfloat16 and float16 matmuls many times slower than float32 ones
(on the project's AVX2 machines 7–150×, depending on the layout), so there 16-bit inputs are
multiplied in float32, from a float32 copy of the head weight made once per pass, and each
result is rounded to the dtype the 16-bit path gives it in: the logits the kernels read stay
16-bit, as the plain ``hidden @ W.T`` would give them; the weight gradient accumulates in
float32 either way. The copy of the weight is the memory this costs (``V × d`` float32 for the
pass), as torch's own chunked ``F.linear_cross_entropy`` pays on a CPU.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["ChunkProducts", "wide_products"]

#: Classes per block when a 16-bit chunk's weight gradient is added to the float32 accumulator
#: in 16-bit products: the temporary is ``[block, d]``, never ``[V, d]``.
_CLASS_BLOCK = 4096


@functools.lru_cache(maxsize=None)
def _cpu_has(*features: str) -> bool:
    from ._backend import load_compiled_core

    found = load_compiled_core().build_info().get("cpu_features", {})
    return any(bool(found.get(name, False)) for name in features)


def wide_products(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a chunk loop on ``device`` multiplies ``dtype`` inputs in float32: 16-bit inputs
    on a CPU without 16-bit matrix instructions (decided at run time, once per process)."""
    if device.type != "cpu":
        return False
    if dtype == torch.bfloat16:
        return not _cpu_has("avx512bf16", "amx-bf16")
    if dtype == torch.float16:
        return not _cpu_has("avx512fp16")
    return False


class ChunkProducts:
    """The products of one pass over the chunks of ``[R, d]`` hidden states with the ``[V, d]``
    head ``weight``; ``rows``: the most rows of a chunk (the float32 scratch's height)."""

    def __init__(self, weight: torch.Tensor, rows: int) -> None:
        self.weight = weight
        self.wide = wide_products(weight.dtype, weight.device)
        self._weight32 = weight.to(torch.float32) if self.wide else None
        self._rows = rows
        self._scratch: torch.Tensor | None = None

    def scratch(self, rows: int) -> torch.Tensor:
        """A float32 ``[rows, V]`` buffer reused by every chunk (wide products only)."""
        if self._scratch is None:
            self._scratch = torch.empty(
                (self._rows, self.weight.shape[0]), dtype=torch.float32, device=self.weight.device
            )
        return self._scratch[:rows]

    def logits(self, hidden_chunk: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """``out = hidden_chunk @ W.T`` (``out`` in the inputs' dtype). Wide: the product in
        float32 (into ``scratch`` when given, a float32 ``[rows, V]`` the caller reuses), then
        rounded into ``out``."""
        if self._weight32 is None:
            return torch.mm(hidden_chunk, self.weight.t(), out=out)
        product = scratch if scratch is not None else self.scratch(hidden_chunk.shape[0])
        torch.mm(hidden_chunk.to(torch.float32), self._weight32.t(), out=product)
        return out.copy_(product)

    def hidden_grad(self, grad: torch.Tensor, out: torch.Tensor, grad32: torch.Tensor | None = None) -> None:
        """``out = grad @ W`` (``out`` ``[rows, d]`` in the inputs' dtype). Wide: from
        ``grad32`` (the gradient in float32, when the caller has it) or ``grad`` widened."""
        if self._weight32 is None:
            torch.mm(grad, self.weight, out=out)
            return
        out.copy_(torch.mm(self._widened(grad, grad32), self._weight32))

    def add_weight_grad(
        self, grad_w: torch.Tensor, grad: torch.Tensor, hidden_chunk: torch.Tensor, grad32: torch.Tensor | None = None
    ) -> None:
        """``grad_w += grad.T @ hidden_chunk``; ``grad_w`` in the accumulation dtype (float32
        for 16-bit inputs)."""
        if self._weight32 is not None:
            grad_w.addmm_(self._widened(grad, grad32).t(), hidden_chunk.to(torch.float32))
        elif grad_w.dtype == grad.dtype:
            grad_w.addmm_(grad.t(), hidden_chunk)
        else:
            vocab = grad.shape[1]
            for low in range(0, vocab, _CLASS_BLOCK):
                high = min(low + _CLASS_BLOCK, vocab)
                grad_w[low:high].add_(torch.mm(grad[:, low:high].t(), hidden_chunk))

    def add_gradients(
        self,
        grad: torch.Tensor,
        hidden_chunk: torch.Tensor,
        grad_h_rows: torch.Tensor | None,
        grad_w: torch.Tensor | None,
        grad_b: torch.Tensor | None,
        grad_work: torch.Tensor | None = None,
    ) -> None:
        """A chunk's ``d / d logits`` into its rows of the hidden gradient and into the weight
        and bias accumulators (those not None). ``grad``: in the inputs' dtype; ``grad_work``:
        the same in the accumulation dtype when the caller has it (float32 for 16-bit inputs),
        which the wide products and the bias gradient then read."""
        if grad_work is None and self._weight32 is not None and (grad_h_rows is not None or grad_w is not None):
            grad_work = self.widen(grad)
        if grad_h_rows is not None:
            self.hidden_grad(grad, grad_h_rows, grad_work)
        if grad_w is not None:
            self.add_weight_grad(grad_w, grad, hidden_chunk, grad_work)
        if grad_b is not None:
            grad_b.add_((grad if grad_work is None else grad_work).sum(dim=0, dtype=grad_b.dtype))

    def widen(self, grad: torch.Tensor) -> torch.Tensor | None:
        """``grad`` in float32 (in the scratch) for the wide products of one chunk; None when
        the products run in the inputs' dtype."""
        return None if self._weight32 is None else self.scratch(grad.shape[0]).copy_(grad)

    def _widened(self, grad: torch.Tensor, grad32: torch.Tensor | None) -> torch.Tensor:
        return self.widen(grad) if grad32 is None else grad32
