"""GRU and LSTM sequence models for dynamical systems, on the fused sequence ops.

- GRU, LSTM: drop-in torch.nn.GRU / torch.nn.LSTM (same parameter names, so state_dicts
  load both ways; stacked layers and both directions) whose forward runs
  latentfast::gru_sequence / lstm_sequence, one call per layer and direction.
- SequenceModel: GRU or LSTM + linear readout for next-step prediction (teacher forcing
  while training), closed-loop forecasting, and the Lyapunov spectrum of the learned
  closed-loop map s_{t+1} = Cell(readout(h_t), s_t) from its analytic Jacobian (the state
  s is h for the GRU and (h, c) for the LSTM).
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from latentfast.ops._checks import check_tensor
from latentfast.ops.rnn import gru_sequence, lstm_sequence
from latentfast.ops.dynamics import rnn_lyapunov_spectrum
from latentfast.reference.dynamics import gru_step, lstm_step
from latentfast.reference.dynamics import lyapunov_spectrum as benettin_spectrum


def _reverse_time(x: Tensor, lengths: Tensor | None) -> Tensor:
    """x [T, B, F] with each sequence's first lengths[b] steps reversed (all T without
    lengths); the padding after them stays in place. Its own inverse."""
    if lengths is None:
        return x.flip(0)
    t = torch.arange(x.shape[0], device=x.device)[:, None]
    n = lengths.to(x.device)[None, :]
    idx = torch.where(t < n, n - 1 - t, t)
    return x.gather(0, idx[:, :, None].expand_as(x))


class _RNNBase(nn.Module):
    """The parameters of a torch.nn RNN (same names, shapes and initialisation) and what its
    forward shares: torch.nn's constructor signature, stacked layers (dropout
    between them while training), both directions, unbatched inputs and PackedSequence
    inputs. Each layer and direction runs as one fused sequence op."""

    def __init__(self, name: str, n_gates: int, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if not isinstance(bias, bool):
            raise ValueError(f"bias must be True or False, got {bias!r}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
            raise ValueError(f"dropout should be a number in [0, 1], got {dropout!r}")
        if dropout > 0 and num_layers == 1:  # as torch.nn warns
            warnings.warn(f"dropout={dropout} and num_layers=1: dropout applies between recurrent layers only, "
                          "so it does nothing here (as in torch.nn)", UserWarning, stacklevel=3)
        self.mode = name
        self.input_size, self.hidden_size, self.batch_first = input_size, hidden_size, batch_first
        self.num_layers, self.bias, self.dropout, self.bidirectional = num_layers, bias, float(dropout), bool(bidirectional)
        self.proj_size = 0
        f = {"device": device, "dtype": dtype}
        dirs = 2 if self.bidirectional else 1
        self._layer_names: list[tuple[str, ...]] = []  # per layer and direction, torch.nn's order
        kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")[:4 if bias else 2]
        for layer in range(num_layers):
            width = input_size if layer == 0 else hidden_size * dirs
            for suffix in ("", "_reverse")[:dirs]:
                names = tuple(f"{k}_l{layer}{suffix}" for k in kinds)
                shapes = ((n_gates * hidden_size, width), (n_gates * hidden_size, hidden_size),
                          (n_gates * hidden_size,), (n_gates * hidden_size,))
                for key, shape in zip(names, shapes):
                    setattr(self, key, nn.Parameter(torch.empty(shape, **f)))
                self._layer_names.append(names)
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def reset_parameters(self) -> None:
        """torch.nn's initialisation: every weight and bias uniform in +-1/sqrt(hidden_size)."""
        k = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -k, k)

    def flatten_parameters(self) -> None:
        """Does nothing: torch.nn compacts its weights into one buffer for cuDNN; the fused
        kernels take each layer's four parameters as they are. (Kept so that code written for
        torch.nn, which calls it, runs unchanged.)"""

    @property
    def all_weights(self) -> list[list[Tensor]]:
        """[[weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0], ...] per layer and direction
        (without the biases for bias=False), as torch.nn gives it."""
        return [[getattr(self, n) for n in names] for names in self._layer_names]

    def params(self, layer: int = 0, reverse: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(weight_ih, weight_hh, bias_ih, bias_hh) of one layer and direction (the first
        layer's forward direction by default: the cell a one-layer model steps); zero biases,
        constants, for bias=False."""
        if not 0 <= layer < self.num_layers or (reverse and not self.bidirectional):
            raise ValueError(f"no layer {layer}{' reverse' if reverse else ''} in a {self.num_layers}-layer "
                             f"{'bidirectional ' if self.bidirectional else ''}{self.mode}")
        got = tuple(getattr(self, n) for n in self._layer_names[layer * self.num_directions + int(reverse)])
        if self.bias:
            return got
        zeros = got[0].new_zeros(got[0].shape[0])
        return (*got, zeros, zeros)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s

    def _check_states(self, states: tuple, unbatched: bool) -> None:
        n = self.num_layers * self.num_directions
        want = f"[{n}, H]" if unbatched else f"[{n}, B, H]"
        for st in states:
            if st is None:
                continue
            if not isinstance(st, Tensor):
                raise TypeError(f"initial states must be tensors, got {type(st).__name__}")
            if st.dim() != (2 if unbatched else 3) or st.shape[0] != n:
                raise ValueError(f"initial states must be {want} (num_layers * num_directions = {n} first)"
                                 f"{' for an unbatched input' if unbatched else ''}, got shape {tuple(st.shape)}")

    def _layer(self, x: Tensor, states: tuple, params: tuple) -> tuple[Tensor, tuple, tuple]:
        """One layer and direction over x [T, B, F] from states [B, H] (or None): its output
        [T, B, H], final states [B, H] and the states of every step [T, B, H]."""
        raise NotImplementedError

    def _stack(self, x: Tensor, states: tuple, lengths: Tensor | None) -> tuple[Tensor, tuple]:
        """Every layer and direction over x [T, B, I] (time first) from states [L D, B, H] (or
        None): the last layer's output [T, B, D H] and the final states [L D, B, H], each
        sequence's at its own length where lengths are given (a padded batch)."""
        dirs, finals = self.num_directions, [[] for _ in states]
        if lengths is not None:  # where each sequence's final states sit in the padded batch
            last, rows = (lengths - 1).to(x.device), torch.arange(x.shape[1], device=x.device)
        for layer in range(self.num_layers):
            if layer and self.dropout and self.training:
                x = nn.functional.dropout(x, self.dropout, training=True)
            outs = []
            for d in range(dirs):
                i = layer * dirs + d
                st = tuple(None if s is None else s[i] for s in states)
                inp = _reverse_time(x, lengths) if d else x
                out, fin, every = self._layer(inp, st, self.params(layer, bool(d)))
                if lengths is not None and out.shape[0]:
                    fin = tuple(e[last, rows] for e in every)
                for acc, f in zip(finals, fin):
                    acc.append(f)
                outs.append(_reverse_time(out, lengths) if d else out)
            x = outs[0] if dirs == 1 else torch.cat(outs, 2)
        return x, tuple(torch.stack(f) for f in finals)

    def _run(self, x, states: tuple):
        """torch.nn's input forms around _stack: returns (out, final states [L D, B, H], or
        [L D, H] for an unbatched x; out a PackedSequence for a packed x)."""
        if isinstance(x, nn.utils.rnn.PackedSequence):
            self._check_states(states, unbatched=False)
            return self._run_packed(x, states)
        unbatched = isinstance(x, Tensor) and x.dim() == 2
        self._check_states(states, unbatched=unbatched)
        if unbatched:  # [T, I]: a batch of one, states [L D, H]
            out, finals = self._stack(x.unsqueeze(1), tuple(None if s is None else s.unsqueeze(1) for s in states),
                                      None)
            return out.squeeze(1), tuple(f.squeeze(1) for f in finals)
        if isinstance(x, Tensor) and x.dim() != 3:
            raise ValueError(f"x must be [T, B, {self.input_size}] ([B, T, {self.input_size}] with batch_first), "
                             f"[T, {self.input_size}] unbatched, or a PackedSequence; got shape {tuple(x.shape)}")
        xt = x.transpose(0, 1) if self.batch_first and isinstance(x, Tensor) else x
        out, finals = self._stack(xt, states, None)
        return (out.transpose(0, 1) if self.batch_first else out), finals

    def _run_packed(self, x, states: tuple):
        # the padded batch through the whole sequence (a recurrence is causal, so the padding
        # steps after a sequence change none of its outputs; the reverse direction reverses each
        # sequence within its own length); the final states taken at each sequence's own length.
        # Padded rows, initial and final states are in the batch's original order, as in torch.nn.
        padded, lengths = nn.utils.rnn.pad_packed_sequence(x, batch_first=False)
        out, finals = self._stack(padded, states, lengths)
        sorted_idx = x.sorted_indices
        out_sorted = out if sorted_idx is None else out.index_select(1, sorted_idx)
        lengths_sorted = lengths if sorted_idx is None else lengths[sorted_idx.cpu()]
        data = nn.utils.rnn.pack_padded_sequence(out_sorted, lengths_sorted).data
        packed = nn.utils.rnn.PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
        return packed, finals


class GRU(_RNNBase):
    """GRU with torch.nn.GRU's parameters, constructor and call signature, each layer and
    direction one fused gru_sequence call.

    forward(x [T, B, I] ([B, T, I] with batch_first), [T, I] unbatched, or a PackedSequence;
    h0 [L D, B, H] ([L D, H] unbatched; L = num_layers, D = 2 if bidirectional else 1) or None)
    -> (out [T, B, D H], h_n [L D, B, H]). A packed batch runs padded to its longest
    sequence; h_n is each sequence's state at its own length.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, device=None,
                 dtype=None):
        super().__init__("GRU", 3, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device, dtype)

    def _layer(self, x, states, params):
        out, h_n = gru_sequence(x, states[0], *params)
        return out, (h_n,), (out,)

    def forward(self, x, h0: Tensor | None = None):
        """As torch.nn.GRU.forward: x [T, B, I] ([B, T, I] with batch_first, [T, I] unbatched, or a
        PackedSequence), h0 [L D, B, H] or None -> (output, h_n [L D, B, H])."""
        out, (h_n,) = self._run(x, (h0,))
        return out, h_n


class LSTM(_RNNBase):
    """LSTM with torch.nn.LSTM's parameters, constructor and call signature, each layer and
    direction one fused lstm_sequence call.

    forward(x [T, B, I] ([B, T, I] with batch_first), [T, I] unbatched, or a PackedSequence;
    hx = (h0, c0) each [L D, B, H] ([L D, H] unbatched), or None) -> (out [T, B, D H],
    (h_n, c_n) each [L D, B, H]). proj_size must be 0 (a ValueError otherwise).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None):
        if proj_size:
            raise ValueError(f"latentfast LSTM has no projection (proj_size={proj_size!r}); use torch.nn.LSTM")
        super().__init__("LSTM", 4, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device, dtype)

    def _layer(self, x, states, params):
        pair = None if states[0] is None else states
        out, (h_n, c_n), cells = lstm_sequence(x, pair, *params, return_cells=True)
        return out, (h_n, c_n), (out, cells)

    def forward(self, x, hx: tuple[Tensor, Tensor] | None = None):
        """As torch.nn.LSTM.forward: x as for GRU, hx = (h0, c0), each [L D, B, H], or None ->
        (output, (h_n, c_n))."""
        if hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise ValueError("hx must be (h0, c0), each [num_layers * num_directions, B, H], or None")
        if hx is not None and (hx[0] is None) != (hx[1] is None):
            raise ValueError("hx must give both h0 and c0")
        out, (h_n, c_n) = self._run(x, (None, None) if hx is None else tuple(hx))
        return out, (h_n, c_n)


class SequenceModel(nn.Module):
    """x_{t+1} ~ readout(h_{t+1}), h_{t+1} = RNN(x_t, h_t), on states x [B, T, D].

    cell: "gru" or "lstm"; num_layers: stacked recurrent layers (the readout reads the top
    one). The recurrent state is every layer's h, [B, L*H], for the GRU, and every layer's h
    then every layer's c, [B, 2*L*H], for the LSTM (with one layer: h [B, H] and (h, c)
    [B, 2H]; what forward and forecast return and lyapunov_spectrum takes). As torch.nn's
    recurrent layers, every method also takes one series [T, D] (one state [S]) and returns its
    results without the batch dimension.
    """

    def __init__(self, dim: int, hidden: int = 64, cell: str = "gru", num_layers: int = 1):
        super().__init__()
        if cell not in ("gru", "lstm"):
            raise ValueError(f"cell must be 'gru' or 'lstm', got {cell!r}")
        self.rnn = (GRU if cell == "gru" else LSTM)(dim, hidden, num_layers, batch_first=True)
        self.readout = nn.Linear(hidden, dim)
        self.dim, self.hidden, self.cell, self.num_layers = dim, hidden, cell, num_layers

    @property
    def state_size(self) -> int:
        per = self.num_layers * self.hidden
        return per if self.cell == "gru" else 2 * per

    def _check_states(self, name: str, s: Tensor) -> None:  # states [B, S]
        check_tensor(name, s, 2)
        if s.shape[1] != self.state_size:
            raise ValueError(f"{name} must be states [B, {self.state_size}], got {tuple(s.shape)}")

    def _top(self, s: Tensor) -> Tensor:  # state [B, S] -> the top layer's h [B, H]
        return s[:, (self.num_layers - 1) * self.hidden:self.num_layers * self.hidden]

    def _pack(self, hx) -> Tensor:  # module state ([L, B, H], or a pair of them) -> [B, S]
        def flat(t: Tensor) -> Tensor:
            return t.transpose(0, 1).reshape(t.shape[1], t.shape[0] * t.shape[2])
        return flat(hx) if self.cell == "gru" else torch.cat([flat(hx[0]), flat(hx[1])], 1)

    def _cell(self, x: Tensor, s: Tensor) -> Tensor:  # one step of every layer, state [B, S]
        lh = self.num_layers * self.hidden
        hs = s[:, :lh].split(self.hidden, 1)
        cs = s[:, lh:].split(self.hidden, 1) if self.cell == "lstm" else ()
        new_h, new_c = [], []
        for layer in range(self.num_layers):
            if self.cell == "gru":
                x = torch.gru_cell(x, hs[layer], *self.rnn.params(layer))
            else:
                x, c = torch.lstm_cell(x, (hs[layer], cs[layer]), *self.rnn.params(layer))
                new_c.append(c)
            new_h.append(x)
        return torch.cat(new_h + new_c, 1)

    def _check_series(self, name: str, x: Tensor) -> None:
        check_tensor(name, x)
        if x.dim() not in (2, 3) or x.shape[-1] != self.dim or x.shape[-2] < 1:
            raise ValueError(f"{name} must be [B, T, {self.dim}] (or one series [T, {self.dim}]) with T >= 1, got "
                             f"{tuple(x.shape)}")

    def _one_state(self, h0) -> Tensor | None:  # one series' h0: its state [S] (or None) as a batch of one
        if h0 is None:
            return None
        if not (isinstance(h0, Tensor) and h0.dim() == 1):
            got = tuple(h0.shape) if isinstance(h0, Tensor) else type(h0).__name__
            raise ValueError(f"for one series [T, {self.dim}], h0 must be its state [S] = [{self.state_size}] or None, "
                             f"got {got}")
        return h0[None]

    def _unpack(self, s: Tensor, batch: int):  # state [B, S] -> the module's (h0 or (h0, c0))
        check_tensor("h0", s, 2)
        if tuple(s.shape) != (batch, self.state_size):
            raise ValueError(f"h0 must be the state [B, S] = [{batch}, {self.state_size}] (as forward and forecast "
                             f"return it), or the {self.cell.upper()} module's own state; got {tuple(s.shape)}")
        def unflat(t: Tensor) -> Tensor:
            return t.reshape(batch, self.num_layers, self.hidden).transpose(0, 1).contiguous()
        if self.cell == "gru":
            return unflat(s)
        lh = self.num_layers * self.hidden
        return unflat(s[:, :lh]), unflat(s[:, lh:])

    def forward(self, x: Tensor, h0=None) -> tuple[Tensor, Tensor]:
        """Teacher-forced one-step predictions [B, T, D] of x[:, 1:], and the last state [B, S].

        h0: the state to start from: [B, S] as this method and forecast return it (so a long
        series can be run in chunks, each from the last one's state), or the RNN module's own
        layout (h0 [1, B, H]; (h0, c0) for the LSTM); None: zeros. One series x [T, D] (with
        h0 [S] or None) gives ([T, D], [S])."""
        self._check_series("x", x)
        if x.dim() == 2:
            pred, s = self(x[None], self._one_state(h0))
            return pred[0], s[0]
        if isinstance(h0, Tensor) and h0.dim() == 2:
            h0 = self._unpack(h0, x.shape[0])
        out, hx = self.rnn(x, h0)
        return self.readout(out), self._pack(hx)

    @torch.no_grad()
    def forecast(self, context: Tensor, n_steps: int, h0=None) -> tuple[Tensor, Tensor]:
        """Warm up on context [B, T0, D] (from state h0, as forward takes it; None: zeros), then
        run closed loop (each prediction is the next input) for n_steps. Returns (forecast
        [B, n_steps, D], states [B, n_steps, S]); ([n_steps, D], [n_steps, S]) for one series
        [T0, D]."""
        self._check_series("context", context)
        if context.dim() == 2:
            xs, ss = self.forecast(context[None], n_steps, self._one_state(h0))
            return xs[0], ss[0]
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        pred, s = self(context, h0)
        if n_steps == 0:
            return pred.new_empty((pred.shape[0], 0, self.dim)), s.new_empty((s.shape[0], 0, s.shape[1]))
        x = pred[:, -1]
        xs, ss = [], []
        for _ in range(n_steps):
            xs.append(x)
            ss.append(s)
            s = self._cell(x, s)
            x = self.readout(self._top(s))
        return torch.stack(xs, 1), torch.stack(ss, 1)

    @torch.no_grad()
    def closed_loop_step(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """s_{t+1} = Cell(readout(h_t), s_t) [B, S] and its Jacobian [B, S, S] (for one state
        [S]: [S] and [S, S]). Analytic for one layer; stacked layers by torch.func.jacfwd."""
        if isinstance(s, Tensor) and s.dim() == 1:
            nxt, jac = self.closed_loop_step(s[None])
            return nxt[0], jac[0]
        self._check_states("s", s)
        if self.num_layers > 1:
            def step(si: Tensor) -> tuple[Tensor, Tensor]:  # one state [S] -> the next (and as aux)
                nxt = self._cell(self.readout(self._top(si[None])), si[None])[0]
                return nxt, nxt
            jac, nxt = torch.func.vmap(torch.func.jacfwd(step, has_aux=True))(s)  # the step once
            return nxt, jac
        h = s[:, :self.hidden]
        x = self.readout(h)
        if self.cell == "gru":
            return gru_step(x, h, *self.rnn.params(), dx_dh=self.readout.weight)
        h_new, c_new, jac = lstm_step(x, h, s[:, self.hidden:], *self.rnn.params(), dx_dh=self.readout.weight)
        return torch.cat([h_new, c_new], 1), jac

    @torch.no_grad()
    def lyapunov_spectrum(self, s0: Tensor, k: int, n_steps: int, dt: float = 1.0, qr_every: int = 1,
                          transient: int = 0) -> Tensor:
        """Leading k exponents [B, k] of the closed-loop map from states s0 [B, S] (per unit
        time with dt), by the fused latentfast::rnn_lyapunov op (tangent rows, no [S, S]
        Jacobians); [k] from one state [S]. With stacked layers (which the op does not take):
        Benettin's method on closed_loop_step's [B, S, S] Jacobians
        (latentfast.reference.dynamics.lyapunov_spectrum; slower)."""
        if isinstance(s0, Tensor) and s0.dim() == 1:
            return self.lyapunov_spectrum(s0[None], k, n_steps, dt, qr_every, transient)[0]
        if self.num_layers > 1:
            self._check_states("s0", s0)
            return benettin_spectrum(self.closed_loop_step, s0, k, n_steps, dt=dt, qr_every=qr_every,
                                     transient=transient)
        return rnn_lyapunov_spectrum(self.cell, s0, k, n_steps, *self.rnn.params(), self.readout.weight,
                                     self.readout.bias, dt=dt, qr_every=qr_every, transient=transient)[0]


def _window_starts(t_len: int, window: int) -> Tensor:
    """Start steps of the training windows of fit_sequence_model in a trajectory of t_len
    points: every window // 2 steps from 0, up to and including the last start that leaves
    the window + 1 points a window needs (t_len - window - 1)."""
    if not 0 < window < t_len:
        raise ValueError(f"need 0 < window < t_len, got window {window}, t_len {t_len}")
    return torch.arange(0, t_len - window, max(window // 2, 1), device="cpu")


def fit_sequence_model(model: SequenceModel, data: Tensor, epochs: int = 20, window: int = 64,
                       batch_size: int = 64, lr: float = 3e-3, warmup: int = 8, seed: int = 0,
                       progress: bool = True) -> list[float]:
    """Next-step training with teacher forcing on windows of trajectories data [N, T, D].
    Windows of window + 1 points start every window // 2 steps of each trajectory, up to the
    last start that fits; each epoch visits every (trajectory, start) pair once, in random
    order. The first `warmup` predictions of a window are not scored (the state is still
    cold). Returns the mean loss per epoch."""
    if data.dim() != 3 or data.shape[-1] != model.dim or data.shape[0] < 1:
        raise ValueError(f"data must be [N, T, {model.dim}] with N >= 1, got {tuple(data.shape)}")
    if not 0 <= warmup < window < data.shape[1]:
        raise ValueError(f"need 0 <= warmup < window < T (a window scores window - warmup predictions and needs "
                         f"window + 1 points), got warmup {warmup}, window {window}, T {data.shape[1]}")
    if batch_size < 1 or epochs < 0:
        raise ValueError(f"need batch_size >= 1 and epochs >= 0, got {batch_size} and {epochs}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(epochs, 1))
    n, t_len, _ = data.shape
    starts = _window_starts(t_len, window)
    pairs = torch.cartesian_prod(torch.arange(n, device="cpu"), starts)
    steps = torch.arange(window + 1, device=data.device)
    history = []
    bar = tqdm(range(epochs), desc=model.cell.upper(), disable=not progress)
    for _ in bar:
        perm = pairs[torch.randperm(len(pairs), generator=gen, device=gen.device)].to(data.device)
        total = data.new_zeros(())  # read back once per epoch, not per step
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            seg = data[idx[:, :1], idx[:, 1:] + steps]  # [b, window + 1, D] in one gather
            pred, _ = model(seg[:, :-1])
            loss = ((pred[:, warmup:] - seg[:, 1 + warmup:]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
        sched.step()
        history.append(total.item() / len(perm))
        bar.set_postfix(loss=f"{history[-1]:.2e}", refresh=False)
    return history


def valid_prediction_time(forecast: Tensor, truth: Tensor, scale: Tensor, threshold: float = 0.4) -> Tensor:
    """Steps until the normalised error sqrt(mean_d ((f_d - x_d) / scale_d)^2) first exceeds
    threshold, per trajectory [B] (forecast, truth [B, T, D]; scale [D] or a number, > 0, e.g.
    the data's standard deviation); T where it never does. A NaN error (a forecast that
    diverged to NaN) counts as past the threshold."""
    check_tensor("forecast", forecast, 3)
    check_tensor("truth", truth, 3, like=forecast)
    if forecast.shape != truth.shape:
        raise ValueError(f"forecast and truth must have the same shape, got {tuple(forecast.shape)} and "
                         f"{tuple(truth.shape)}")
    dim = forecast.shape[-1]
    scale = torch.as_tensor(scale, dtype=forecast.dtype, device=forecast.device)
    if scale.dim() > 1 or (scale.dim() == 1 and scale.shape[0] not in (1, dim)):
        raise ValueError(f"scale must be a number or [{dim}] (one per state variable), got shape {tuple(scale.shape)}")
    if not bool(((scale > 0) & torch.isfinite(scale)).all()):
        raise ValueError(f"scale must be finite and > 0, got {scale.tolist()}")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    err = ((forecast - truth) / scale).norm(dim=-1) / math.sqrt(dim)
    over = ~(err <= threshold)  # NaN errors too
    first = torch.where(over.any(1), over.float().argmax(1), torch.full_like(over[:, 0], over.shape[1],
                                                                            dtype=torch.long))
    return first
