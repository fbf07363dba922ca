"""Token dispatch for the grouped expert GEMMs: group the (token, slot) pairs by expert, and back.

A token routed to k experts makes k *pairs*; pair ``q = t * k + j`` is token t's j-th choice
(``router_indices[t, j]``). The kernels work on the pairs sorted by expert ("rows"): row p belongs to
expert e when ``offsets[e] <= p < offsets[e + 1]``. Two maps lead back:

* ``row_token[p]``: the token whose hidden state row p reads (the gather of the first GEMM's input);
* ``row_pair[p]``: the pair q of row p. Per-pair outputs are written at row q of a ``[T * k, ...]``
  buffer, so combining over a token's k experts is a reduction over a contiguous ``[T, k, ...]`` view
  (deterministic, no atomics).

Everything is plain torch on the device and never synchronises with the host (counts come from
``scatter_add_``, not ``bincount``, whose output size needs the maximum), so the whole expert layer
can be captured in a CUDA graph. Sizes that set kernel grids (``T * k``, E) are known on the host.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Dispatch(NamedTuple):
    offsets: torch.Tensor  # int32 [E + 1]: rows of expert e are offsets[e]:offsets[e + 1]
    row_token: torch.Tensor  # int32 [P]: token of each sorted row
    row_pair: torch.Tensor  # int32 [P]: pair index t * k + j of each sorted row
    num_experts: int
    top_k: int

    @property
    def num_rows(self) -> int:
        return self.row_pair.numel()

    @property
    def num_tokens(self) -> int:
        return self.num_rows // self.top_k if self.top_k else 0


def build_dispatch(router_indices: torch.Tensor, num_experts: int) -> Dispatch:
    """router_indices [T, k] (any integer dtype) -> Dispatch. Stable: rows of an expert keep token order."""
    if router_indices.dim() != 2:
        raise ValueError(f"router_indices must be [tokens, k], got shape {tuple(router_indices.shape)}")
    T, k = router_indices.shape
    flat = router_indices.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return Dispatch(offsets, (order // k).to(torch.int32), order.to(torch.int32), num_experts, k)


def expert_of_rows(dispatch: Dispatch) -> torch.Tensor:
    """int64 [P]: the expert of each sorted row (for references and tests)."""
    counts = (dispatch.offsets[1:] - dispatch.offsets[:-1]).long()
    return torch.repeat_interleave(torch.arange(dispatch.num_experts, device=counts.device), counts)


def combine_pairs(pair_rows: torch.Tensor, top_k: int) -> torch.Tensor:
    """[T * k, D] per-pair rows -> [T, D], summing each token's k rows (the inverse of the gather)."""
    P, D = pair_rows.shape
    return pair_rows.view(P // top_k, top_k, D).sum(1)
