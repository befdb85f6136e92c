"""Activation memory, measured exactly: bytes of the tensors autograd saves for backward."""

from __future__ import annotations

import torch


class SavedBytes:
    """Sum of the bytes of tensors autograd saves for backward inside the context (each storage counted
    once; the model's own weights, held either way, excluded)::

        with SavedBytes(model) as m:
            loss = model(x).sum()
        m.total
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.total = 0

    def __enter__(self) -> SavedBytes:
        self.total, self.seen = 0, set(self.weights)

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.seen:
                self.seen.add(ptr)
                self.total += t.untyped_storage().nbytes()
            return t

        self.ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.ctx.__exit__(*exc)
