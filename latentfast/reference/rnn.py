"""Reference (specification) of the recurrent sequence ops, in plain PyTorch.

gru_sequence runs a single-layer GRU (torch.nn.GRU conventions, gate order r, z, n) over a
whole sequence, x [T, B, I], h0 [B, H]:
    gi_t = W_ih x_t + b_ih,  gh_t = W_hh h_t + b_hh
    r = sigmoid(gi_r + gh_r),  z = sigmoid(gi_z + gh_z),  n = tanh(gi_n + r * gh_n)
    h_{t+1} = n + z * (h_t - n)
and returns out [T, B, H] (out[t] = h_{t+1}). The training form also returns the gates
[T, B, 4H] = (r, z, n, gh_n) that the backward through time needs.
"""
from __future__ import annotations

import torch
from torch import Tensor


def gru_sequence(x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
                 bias_hh: Tensor) -> tuple[Tensor, Tensor]:
    """(out [T, B, H], gates [T, B, 4H] = cat(r, z, n, gh_n))."""
    hs = h0.shape[1]
    gi_all = x @ weight_ih.T + bias_ih
    h = h0
    outs, gates = [], []
    for t in range(x.shape[0]):
        gi = gi_all[t]
        gh = h @ weight_hh.T + bias_hh
        r = torch.sigmoid(gi[:, :hs] + gh[:, :hs])
        z = torch.sigmoid(gi[:, hs:2 * hs] + gh[:, hs:2 * hs])
        ghn = gh[:, 2 * hs:]
        n = torch.tanh(gi[:, 2 * hs:] + r * ghn)
        h = n + z * (h - n)
        outs.append(h)
        gates.append(torch.cat([r, z, n, ghn], dim=1))
    if not outs:
        return x.new_empty((0, *h0.shape)), x.new_empty((0, h0.shape[0], 4 * hs))
    return torch.stack(outs), torch.stack(gates)


def gru_sequence_backward(grad_out: Tensor, x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                          out: Tensor, gates: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward through time: (grad x, grad h0, grad W_ih, grad W_hh, grad b_ih, grad b_hh).

    Per step, with dh the gradient reaching h_{t+1}:
      dn = dh (1 - z),  dz = dh (h_t - n),  da_n = dn (1 - n^2),
      da_r = da_n gh_n r (1 - r),  da_z = dz z (1 - z),
      dGI_t = (da_r, da_z, da_n),  dGH_t = (da_r, da_z, da_n r),
      dh_t = dh z + dGH_t W_hh;
    then the weight gradients are sums over all steps (one GEMM each).
    """
    t_len, b, hs = out.shape
    h_prev = torch.cat([h0[None], out[:-1]], 0)
    r, z, n, ghn = gates.split(hs, dim=2)
    dgi = torch.empty((t_len, b, 3 * hs), dtype=x.dtype, device=x.device)
    dgh = torch.empty_like(dgi)
    dh = torch.zeros_like(h0)
    for t in range(t_len - 1, -1, -1):
        dh = dh + grad_out[t]
        dn = dh * (1 - z[t])
        dz = dh * (h_prev[t] - n[t])
        da_n = dn * (1 - n[t] ** 2)
        da_r = da_n * ghn[t] * r[t] * (1 - r[t])
        da_z = dz * z[t] * (1 - z[t])
        dgi[t] = torch.cat([da_r, da_z, da_n], 1)
        dgh[t] = torch.cat([da_r, da_z, da_n * r[t]], 1)
        dh = dh * z[t] + dgh[t] @ weight_hh
    dgi2, dgh2 = dgi.reshape(-1, 3 * hs), dgh.reshape(-1, 3 * hs)
    return (dgi @ weight_ih, dh, dgi2.T @ x.reshape(-1, x.shape[2]), dgh2.T @ h_prev.reshape(-1, hs),
            dgi2.sum(0), dgh2.sum(0))
