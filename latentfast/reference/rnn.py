"""Reference (specification) of the recurrent sequence ops (GRU, LSTM), in plain PyTorch.

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


# ---------------------------------------------------------------------------------- LSTM
# lstm_sequence runs a single-layer LSTM (torch.nn.LSTM conventions, gate order i, f, g, o):
#     a_t = W_ih x_t + b_ih + W_hh h_t + b_hh
#     i, f, o = sigmoid(a_i, a_f, a_o),  g = tanh(a_g)
#     c_{t+1} = f c_t + i g,  h_{t+1} = o tanh(c_{t+1})
# and returns out [T, B, H] (h_{t+1}) and cells [T, B, H] (c_{t+1}); the training form
# also returns the activated gates [T, B, 4H] = (i, f, g, o).


def lstm_sequence(x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor,
                  bias_hh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(out [T, B, H], cells [T, B, H], gates [T, B, 4H] = cat(i, f, g, o))."""
    hs = h0.shape[1]
    a_all = x @ weight_ih.T + bias_ih + bias_hh
    h, c = h0, c0
    outs, cells, gates = [], [], []
    for t in range(x.shape[0]):
        a = a_all[t] + h @ weight_hh.T
        i, f, g, o = a.split(hs, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        h = o * torch.tanh(c)
        outs.append(h)
        cells.append(c)
        gates.append(torch.cat([i, f, g, o], dim=1))
    if not outs:
        empty = x.new_empty((0, *h0.shape))
        return empty, empty.clone(), x.new_empty((0, h0.shape[0], 4 * hs))
    return torch.stack(outs), torch.stack(cells), torch.stack(gates)


def lstm_sequence_backward(grad_out: Tensor, grad_cells: Tensor, x: Tensor, h0: Tensor, c0: Tensor,
                           weight_ih: Tensor, weight_hh: Tensor, out: Tensor, cells: Tensor, gates: Tensor
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward through time: grads of (x, h0, c0, W_ih, W_hh, b_ih, b_hh).

    Per step, with dh, dc the gradients reaching h_{t+1}, c_{t+1} (grad_out[t] and
    grad_cells[t] included) and tc = tanh(c_{t+1}):
      dc += dh o (1 - tc^2),  dA_t = (dc g i(1-i), dc c_t f(1-f), dc i (1-g^2), dh tc o(1-o)),
      dc_t = dc f,  dh_t = dA_t W_hh;
    the weight gradients are sums over all steps (one GEMM each); dA_t is the gradient of
    both biases.
    """
    t_len, b, hs = out.shape
    h_prev = torch.cat([h0[None], out[:-1]], 0)
    c_prev = torch.cat([c0[None], cells[:-1]], 0)
    i, f, g, o = gates.split(hs, dim=2)
    da = torch.empty((t_len, b, 4 * hs), dtype=x.dtype, device=x.device)
    dh = torch.zeros_like(h0)
    dc = torch.zeros_like(c0)
    for t in range(t_len - 1, -1, -1):
        dh = dh + grad_out[t]
        tc = torch.tanh(cells[t])
        dc = dc + grad_cells[t] + dh * o[t] * (1 - tc ** 2)
        da[t] = torch.cat([dc * g[t] * i[t] * (1 - i[t]), dc * c_prev[t] * f[t] * (1 - f[t]),
                           dc * i[t] * (1 - g[t] ** 2), dh * tc * o[t] * (1 - o[t])], 1)
        dc = dc * f[t]
        dh = da[t] @ weight_hh
    da2 = da.reshape(-1, 4 * hs)
    db = da2.sum(0)
    return (da @ weight_ih, dh, dc, da2.T @ x.reshape(-1, x.shape[2]), da2.T @ h_prev.reshape(-1, hs),
            db, db.clone())
