"""All K adapters of an ensemble in one batched LoRA product per layer (docs/method.md §3).

At every decoding step the K adapters run on the same prefix in ONE forward: the batch is repeated
once per adapter (adapter-major blocks, see `decoding.engine`) and every LoRA layer applies all K
adapters to their blocks at once.
"""

from __future__ import annotations

import contextlib

import torch

from emorl_ray.decoding.engine import linear


class StackedLoRA:
    """All K adapters in one batched LoRA product per layer, for adapter-major row blocks.

    peft's mixed-adapter batches (`adapter_names=`) gather and scatter every adapter's rows in
    every LoRA layer at every step, in Python; with K contiguous row blocks the whole LoRA term is
    two batched matmuls: delta = bmm(bmm(x_k, A_k^T), (s_k B_k)^T). Inside this context each LoRA
    layer's forward is replaced by base product + stacked term (peft's own forward, which is left
    untouched outside, would add its single active adapter to every row). Adapters of different
    rank are zero-padded to the largest rank.
    """

    def __init__(self, model, names: list[str]):
        self.model, self.names = model, names
        # Each layer's forward is made once, over stacks kept at fixed addresses: a compiled decode
        # step (decoding.static) then sees the same functions and tensors on every decode, and
        # `refresh` can bring a training run's changing adapter in without a recompilation.
        self.layers = [(m, *self._stacks(m)) for m in model.modules()
                       if hasattr(m, "lora_A") and hasattr(m, "base_layer")
                       and isinstance(m.base_layer, torch.nn.Linear) and any(n in m.lora_A for n in names)]
        for _, A, B in self.layers:
            torch._dynamo.mark_static_address(A)  # a CUDA graph reads them in place, no copy per replay
            torch._dynamo.mark_static_address(B)
        self.forwards = [(m, self._forward(m, A, B)) for m, A, B in self.layers]

    def refresh(self) -> StackedLoRA:
        """Copy the adapters' current weights into the stacks, in place."""
        for m, A, B in self.layers:
            self._fill(m, A, B)
        return self

    @staticmethod
    def supported(model, names: list[str]) -> bool:
        for m in model.modules():
            if hasattr(m, "lora_A") and hasattr(m, "base_layer"):
                if not isinstance(m.base_layer, torch.nn.Linear) or any(n in m.lora_variant for n in names):
                    return False
                if getattr(m, "merged_adapters", None):  # a merged adapter lives inside the base weight
                    return False
            if hasattr(m, "lora_embedding_A") and any(n in m.lora_embedding_A for n in names):
                return False
        return True

    def _stacks(self, m):
        """Layer m's (K, in, r) and (K, r, out) stacks, zero-padded to the largest rank."""
        base = m.base_layer.weight
        r = max(m.lora_A[n].weight.shape[0] for n in self.names if n in m.lora_A)
        A = base.new_zeros(len(self.names), base.shape[1], r)
        B = base.new_zeros(len(self.names), r, base.shape[0])
        return self._fill(m, A, B)

    @torch.no_grad()
    def _fill(self, m, A: torch.Tensor, B: torch.Tensor):
        """Write layer m's adapters into their slices of A and B (the padding stays zero)."""
        for k, n in enumerate(self.names):
            if n in m.lora_A:
                a, b = m.lora_A[n].weight, m.lora_B[n].weight
                A[k, :, :a.shape[0]] = a.t()
                B[k, :b.shape[1], :] = (b * m.scaling[n]).t()
        return A, B

    def _forward(self, m, A: torch.Tensor, B: torch.Tensor):
        """Layer m's forward inside the context: base product + the K adapters' stacked term."""
        K, base = len(self.names), m.base_layer
        # Subclasses of Linear (quantized layers) compute their own product.
        product = base if type(base) is not torch.nn.Linear else (
            lambda rows: linear(rows, base.weight, base.bias))

        def forward(x, *args, **kwargs):
            rows = x.reshape(-1, x.shape[-1])
            y = product(rows)
            xa = torch.bmm(rows.view(K, -1, rows.shape[-1]).to(A.dtype), A)
            y.view(K, -1, y.shape[-1]).baddbmm_(xa.to(y.dtype), B.to(y.dtype))
            return y.view(*x.shape[:-1], -1)

        return forward

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        # LoRA layers this context does not replace (other adapters' only) must add nothing.
        self._stack.enter_context(self.model.disable_adapter())
        for m, forward in self.forwards:
            m.forward = forward  # an instance attribute shadows the class's forward until removed
            self._stack.callback(delattr, m, "forward")
        return self

    def __exit__(self, *exc):
        self._stack.close()
