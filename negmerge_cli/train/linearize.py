"""Linearized fine-tuning (tangent task arithmetic): train the model's first-order expansion.

``f_lin(x; p) = f(x; p0) + J_p f(x; p0) (p - p0)``, with ``p0`` the pre-trained weights,
evaluated in one forward-mode pass with :func:`torch.func.jvp`. The trainable parameters
``p`` keep the names and shapes of the original module, so a linearized checkpoint is an
ordinary state dict: the merge engine reads it as usual and the task vector is
``p - p0``. Editing ``p0 - lambda * tau`` and evaluating ``f_lin`` there is exactly the
linearized model's task negation (Ortiz-Jimenez et al., NeurIPS 2023,
https://arxiv.org/abs/2305.12827).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping

import torch
from torch import nn


class LinearizedModel(nn.Module):
    """``module``'s first-order expansion around its current weights (taken as ``p0``).

    ``self.model`` holds the trainable ``p`` (starting at ``p0``, so the expansion starts
    equal to the model); ``p0`` is a frozen copy. ``state_dict()`` is ``self.model``'s
    (the keys of the original module), so checkpoints load into either form.
    """

    def __init__(self, module: nn.Module, base: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.model = module
        reference = copy.deepcopy(module)
        if base is not None:
            reference.load_state_dict(dict(base), strict=True)
        for parameter in reference.parameters():
            parameter.requires_grad_(False)
        # Kept out of the module tree: not trained, not saved, not counted as parameters.
        self.__dict__["_reference"] = reference

    @property
    def reference(self) -> nn.Module:
        return self.__dict__["_reference"]

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # .to(device) / .float() move the frozen expansion point too.
        self.__dict__["_reference"] = self.reference._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> LinearizedModel:
        self.reference.train(mode)
        return super().train(mode)

    def state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[no-untyped-def]
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, jvp

        names = [name for name, _ in self.model.named_parameters()]
        current = dict(self.model.named_parameters())
        base = dict(self.reference.named_parameters())
        buffers = dict(self.reference.named_buffers())
        primals = tuple(base[name] for name in names)
        tangents = tuple(current[name] - base[name] for name in names)

        def call(*params: torch.Tensor) -> torch.Tensor:
            return functional_call(
                self.reference, {**dict(zip(names, params, strict=True)), **buffers}, args
            )

        with _forward_ad_attention():
            out, tangent = jvp(call, primals, tangents)
        return out + tangent


@contextlib.contextmanager
def _forward_ad_attention() -> Iterator[None]:
    """Attention kernels with forward-mode derivatives: nn.MultiheadAttention's fused
    inference path and the fused SDPA kernels have none, the math kernel has."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
