"""Glow building blocks: ActNorm, InvConv1x1, AdditiveCoupling, AffineCoupling, GlowStep.

Every layer has ``forward(x) -> (y, logdet)`` with logdet [N] and ``inverse(y) -> x``.
The hot paths run through latentfast.ops (C++ on CPU, Triton on GPU, or the reference).
Coupling nets output ``h = cat([shift, raw])`` (affine) or ``shift`` (additive); the first
channel half conditions the second.
"""
from __future__ import annotations

import inspect
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentfast.ops import flows as ops
from latentfast.ops._autograd import functorch_active
from latentfast.ops._checks import check_finite, check_like_model, check_tensor, passed_before, remember_passed
from latentfast.reference.flows import fold_actnorm_into_conv


def _check_image(name: str, x: Tensor, channels: int) -> None:
    check_tensor(name, x, 4)
    if x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels, got shape {tuple(x.shape)}")
    check_finite(name, x)


def _process_group_size() -> int:
    """The default process group's world size (1 without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


def _disable_compile(fn, reason: str):
    """torch.compiler.disable(fn), with the reason where this torch takes one (2.7 on)."""
    if "reason" in inspect.signature(torch.compiler.disable).parameters:
        return torch.compiler.disable(fn, reason=reason)
    return torch.compiler.disable(fn)


def _functorch_flag(t: Tensor) -> bool | None:
    """Whether every entry of a bool tensor seen inside torch.func transforms is set: under
    vmap of stacked modules (torch.func.stack_module_state) the flag is a batched tensor, one
    entry per model, that bool() cannot read; its entries are read through the transforms'
    wrappers. None where this torch has no way to unwrap them."""
    f = getattr(torch._C, "_functorch", None)
    if f is None or not hasattr(f, "is_functorch_wrapped_tensor") or not hasattr(f, "get_unwrapped"):
        return None
    while f.is_functorch_wrapped_tensor(t):
        t = f.get_unwrapped(t)
    return bool(t.all())


def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting())


class ActNorm(nn.Module):
    """y = (x + bias) * exp(logs) per channel, initialised from the first batch so that y has
    zero mean and unit variance per channel (Glow, Kingma & Dhariwal 2018).

    Shapes: x [N, C, H, W] -> y [N, C, H, W], logdet [N] = H*W*sum(logs).

    Under torch.distributed (a default process group of more than one process, as with
    DistributedDataParallel) the first batch is the union of every process's first batch:
    the mean and standard deviation are all-reduced, so the replicas start equal (DDP
    broadcasts parameters only when it wraps the model, before this initialisation, and
    each replica would otherwise keep its own). Every process must then make its first
    forward together, as DDP's processes do; set ``sync_init = False`` on a layer (for m in
    model.modules(): ...) for processes that train independent models. torch.nn.DataParallel
    runs copies of the model made for each forward, which cannot initialise the model itself:
    an uninitialised layer raises there; call the model once before wrapping it.
    """

    # class-level defaults too, for modules pickled whole before these attributes existed
    sync_init: bool = True
    _seen_initialized: bool = False

    def __init__(self, channels: int, sync_init: bool = True) -> None:
        super().__init__()
        self.channels, self.sync_init = channels, sync_init
        self.logs = nn.Parameter(torch.zeros(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))
        # whether `initialized` has been seen set (by an eager call or a loaded state dict):
        # what a torch.compile trace can test without reading a tensor
        self._seen_initialized = False

    def _syncs(self) -> bool:
        return self.sync_init and _process_group_size() > 1

    def initialize(self, x: Tensor) -> None:
        """Data-dependent init: bias = -mean, logs = -log(std) over (N, H, W) (of every
        process's x, all-reduced, under torch.distributed; see the class)."""
        if not self._initialize(x):
            raise ValueError("ActNorm cannot be initialised from an empty batch")

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> bool:
        """initialize(x); False (and nothing set) where there is no data to start from."""
        if self._syncs():
            # float64 sums over the processes, then the centred second moment (two passes, as
            # std does): two all-reduces of C + 1 and C values, once per layer
            xs = x.double()
            first = torch.cat([xs.sum(dim=(0, 2, 3)), xs.new_full((1,), x.numel() // max(x.shape[1], 1))])
            torch.distributed.all_reduce(first)
            count = first[-1]
            n_values = int(count.item())
            if n_values == 0:  # every process's batch is empty: wait for data, as one process does
                return False
            mean64 = first[:-1] / count
            second = ((xs - mean64[None, :, None, None]) ** 2).sum(dim=(0, 2, 3))
            torch.distributed.all_reduce(second)
            mean, std = mean64.to(x.dtype), (second / count).sqrt().to(x.dtype)
        else:
            if x.shape[0] == 0:
                return False
            mean = x.mean(dim=(0, 2, 3))
            std = x.std(dim=(0, 2, 3), unbiased=False)
            n_values = x.shape[0] * x.shape[2] * x.shape[3]
        if n_values == 1:
            warnings.warn(f"ActNorm({self.channels}) initialised from one value per channel (a batch of one "
                          f"{x.shape[2]} x {x.shape[3]} image): its standard deviation is 0, so its scale is "
                          "exp(logs) = 1e6; make the first call on a batch of several images", stacklevel=2)
        self.bias.copy_(-mean)
        self.logs.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(True)
        return True

    def maybe_initialize(self, x: Tensor) -> None:
        """Initialise from x on the first call with data (an empty batch waits: its mean and
        standard deviation are NaN; under torch.distributed, until some process has data).
        The `initialized` flag is read back (a GPU synchronisation) only until it has been
        seen set, and again after it is written (load_state_dict), not on every call. Meta
        tensors (shape inference) hold no data to initialise from, and pass through as they
        are."""
        if torch.compiler.is_compiling():
            # A trace cannot branch on the flag's value: a layer not yet seen initialised
            # breaks the graph here and initialises eagerly (under fullgraph=True, an error
            # that says so). The trace guards on the Python flag, so the code compiled once it
            # is set has no break. torch.export cannot run anything eagerly: an error.
            if not self._seen_initialized:
                if _exporting():
                    raise RuntimeError("ActNorm has not been initialised (its data-dependent initialisation "
                                       "runs on the first call): call the model once before exporting it, "
                                       "or load the state dict of an initialised one")
                _maybe_initialize_eagerly(self, x)
            return
        self._maybe_initialize(x)

    def _maybe_initialize(self, x: Tensor) -> None:  # maybe_initialize's eager path
        if x.device.type == "meta":
            return
        if functorch_active():
            # vmap, grad, jacrev, ... : the flag may be batched (stacked models), and the
            # initialisation's writes cannot run (a transform refuses to mutate a captured
            # parameter, and a batched mean does not fit one model's parameter)
            flag = _functorch_flag(self.initialized)
            if flag is None:
                flag = self._seen_initialized
            if not flag:
                raise RuntimeError(
                    "ActNorm has not been initialised, and its data-dependent initialisation cannot run inside "
                    "torch.func transforms (vmap, grad, jacrev, jacfwd, ...): call the model once on a batch "
                    "first (every model before torch.func.stack_module_state), or load the state dict of an "
                    "initialised one")
            return
        if passed_before("actnorm initialized", self.initialized):
            return
        if x.shape[0] == 0 and not self._syncs():  # (synchronised, an empty batch still takes part)
            return
        if not bool(self.initialized):
            if getattr(self, "_is_replica", False):
                # torch.nn.DataParallel runs copies made for this forward: what the copy would
                # write is lost after it, so every step would normalise by its own chunk
                raise RuntimeError(
                    "ActNorm has not been initialised, and this call runs in a torch.nn.DataParallel "
                    "replica, whose parameter writes are lost after the forward (the model would never be "
                    "initialised, each step normalising by its own batch): call the model once on a batch "
                    "before wrapping it in DataParallel, or use DistributedDataParallel (ActNorm then "
                    "initialises from every process's first batch)")
            if not self._initialize(x):
                return
        self._seen_initialized = True
        remember_passed("actnorm initialized", self.initialized)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # a loaded model compiles without the break; the flag read from the state dict's own
        # tensor (a checkpoint's is usually on the CPU), the buffer being checked again anyway
        loaded = state_dict.get(prefix + "initialized")
        flag = loaded if isinstance(loaded, Tensor) else self.initialized
        self._seen_initialized = flag.device.type != "meta" and bool(flag)  # (meta: no value to read)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(x + bias) * exp(logs) per channel of x [N, C, H, W], and the log-det [N] = H W
        sum(logs). The first call with data initialises bias and logs from it."""
        _check_image("x", x, self.channels)
        self.maybe_initialize(x)
        y = (x + self.bias[None, :, None, None]) * torch.exp(self.logs)[None, :, None, None]
        return y, (x.shape[2] * x.shape[3] * self.logs.sum()).expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        """x = y * exp(-logs) - bias."""
        _check_image("y", y, self.channels)
        return y * torch.exp(-self.logs)[None, :, None, None] - self.bias[None, :, None, None]


_maybe_initialize_eagerly = _disable_compile(
    ActNorm._maybe_initialize,
    reason="ActNorm's data-dependent initialisation runs eagerly: call the model once before compiling "
           "it with fullgraph=True (or load a state dict of an initialised one)")


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution y = W x per pixel.

    lu=True (default): W = P L (U + diag(sign_s * exp(log_abs_s))) with P fixed, so
    log|det W| = sum(log_abs_s) costs O(C) and W^-1 comes from triangular solves.
    lu=False: W is a free parameter (log|det| by slogdet, inverse by torch.linalg.inv).
    Initialised to a random rotation. logdet [N] = H*W*log|det W|.
    """

    def __init__(self, channels: int, lu: bool = True) -> None:
        super().__init__()
        self.channels, self.lu = channels, lu
        w = torch.linalg.qr(torch.randn(channels, channels))[0]
        if not lu:
            self.weight = nn.Parameter(w)
            return
        p, low, up = torch.linalg.lu(w)
        s = torch.diagonal(up)
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.lower = nn.Parameter(torch.tril(low, -1))
        self.upper = nn.Parameter(torch.triu(up, 1))
        self.log_abs_s = nn.Parameter(torch.log(torch.abs(s)))

    def weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """(W [C, C], W^-1 [C, C], log|det W| [])."""
        if self.lu:
            return ops.lu_weight(self.perm, self.lower, self.upper, self.sign_s, self.log_abs_s)
        return self.weight, torch.linalg.inv(self.weight), torch.linalg.slogdet(self.weight)[1]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """W x per pixel of x [N, C, H, W], and the log-det [N] = H W log|det W|."""
        _check_image("x", x, self.channels)
        w, _, logdet = self.weights()
        y = ops.actnorm_invconv(x, w, torch.zeros_like(w[0]))
        return y, (x.shape[2] * x.shape[3] * logdet).expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        """W^-1 y per pixel."""
        _check_image("y", y, self.channels)
        _, w_inv, _ = self.weights()
        return ops.actnorm_invconv(y, w_inv, torch.zeros_like(w_inv[0]))


class ZeroConv2d(nn.Module):
    """3x3 conv initialised to zero with a learned output scale exp(3 * scale) (Glow's last
    coupling layer, so every coupling starts as the identity)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.scale = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """conv3x3(x) * exp(3 scale)."""
        return self.conv(x) * torch.exp(self.scale * 3.0)


def coupling_net(in_channels: int, out_channels: int, hidden: int) -> nn.Sequential:
    """Glow's coupling net: conv3x3 -> ReLU -> conv1x1 -> ReLU -> ZeroConv2d."""
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(),
        nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
        ZeroConv2d(hidden, out_channels),
    )


class AffineCoupling(nn.Module):
    """Coupling layer: x = (x_a, x_b), h = net(x_a), y = (x_a, (x_b + shift) * sigmoid(raw+2))
    (affine, Glow) or (x_a, x_b + h) (additive=True, NICE). Channels must be even.

    Example:
        >>> layer = AffineCoupling(4, hidden=16)
        >>> y, logdet = layer(torch.randn(2, 4, 8, 8))
    """

    def __init__(self, channels: int, hidden: int = 512, additive: bool = False,
                 net: nn.Module | None = None) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError(f"a coupling layer needs an even number of channels, got {channels}")
        self.channels, self.additive = channels, additive
        half = channels // 2
        self.net = net if net is not None else coupling_net(half, half if additive else channels, hidden)

    def run_net(self, x_a: Tensor) -> Tensor:
        """net(x_a), checked: a net given by the user must map [N, C/2, H, W] to [N, C, H, W]
        (affine: shift then raw) or [N, C/2, H, W] (additive)."""
        h = self.net(x_a)
        out = x_a.shape[1] if self.additive else 2 * x_a.shape[1]
        if not isinstance(h, Tensor) or h.shape != (x_a.shape[0], out, *x_a.shape[2:]):
            got = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
            raise ValueError(f"the coupling net must map its input {tuple(x_a.shape)} to "
                             f"{(x_a.shape[0], out, *x_a.shape[2:])} ({'the shift' if self.additive else 'shift, then raw'}"
                             f" per channel of the second half), got {got}")
        return h

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(y [N, C, H, W], log-det [N]) with the first channel half passed through and the second
        transformed given net(first half)."""
        _check_image("x", x, self.channels)
        x_a, x_b = x.chunk(2, dim=1)
        y_b, logdet = ops.affine_coupling(x_b, self.run_net(x_a), self.additive)
        return torch.cat([x_a, y_b], dim=1), logdet

    def inverse(self, y: Tensor) -> Tensor:
        """x from y (the first half is unchanged, so net(y_a) = net(x_a))."""
        _check_image("y", y, self.channels)
        y_a, y_b = y.chunk(2, dim=1)
        x_b, _ = ops.affine_coupling_inverse(y_b, self.run_net(y_a), self.additive)
        return torch.cat([y_a, x_b], dim=1)


class AdditiveCoupling(AffineCoupling):
    """NICE's additive coupling y_b = x_b + net(x_a) (volume preserving: logdet = 0)."""

    def __init__(self, channels: int, hidden: int = 512, net: nn.Module | None = None) -> None:
        super().__init__(channels, hidden, additive=True, net=net)


class GlowStep(nn.Module):
    """One Glow step: ActNorm -> InvConv1x1 -> coupling, with the first two fused.

    Fused path (default): ActNorm is folded into W (A = W diag(e^logs), c = W(e^logs * b));
    y_a = (A x + c)[:C/2] feeds the coupling net, and one kernel then computes the whole
    step output (A x + c, with the coupling on the second half) in one pass over x.
    fused=False runs the three sub-layers one after another (same numbers, slower).

    net: the coupling net, any module mapping [N, C/2, H, W] to [N, C, H, W] (affine: shift,
    then raw) or [N, C/2, H, W] (additive); default Glow's (coupling_net with `hidden`).

    Shapes: x [N, C, H, W] -> y [N, C, H, W], logdet [N].
    """

    def __init__(self, channels: int, hidden: int = 512, lu: bool = True, additive: bool = False,
                 fused: bool = True, net: nn.Module | None = None) -> None:
        super().__init__()
        self.channels, self.fused = channels, fused
        self.actnorm = ActNorm(channels)
        self.invconv = InvConv1x1(channels, lu=lu)
        self.coupling = AffineCoupling(channels, hidden, additive=additive, net=net)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """ActNorm, 1x1 conv and coupling of x [N, C, H, W]: (y, log-det [N]). fused=True (default)
        runs the folded map and the coupling as latentfast ops."""
        if not self.fused:
            y, ld0 = self.actnorm(x)
            y, ld1 = self.invconv(y)
            y, ld2 = self.coupling(y)
            return y, ld0 + ld1 + ld2
        _check_image("x", x, self.channels)
        self.actnorm.maybe_initialize(x)
        w, _, logdet_w = self.invconv.weights()
        a, c = fold_actnorm_into_conv(self.actnorm.logs, self.actnorm.bias, w)
        half = self.channels // 2
        h = self.coupling.run_net(ops.actnorm_invconv(x, a[:half], c[:half]))
        y, logdet = ops.actnorm_invconv_coupling(x, a, c, h, self.coupling.additive)
        return y, logdet + x.shape[2] * x.shape[3] * (self.actnorm.logs.sum() + logdet_w)

    def inverse(self, y: Tensor) -> Tensor:
        """x from y: the coupling's inverse, then the inverse of the folded ActNorm + 1x1 conv map."""
        if not self.fused:
            return self.actnorm.inverse(self.invconv.inverse(self.coupling.inverse(y)))
        _check_image("y", y, self.channels)
        z = self.coupling.inverse(y)
        _, w_inv, _ = self.invconv.weights()
        # x = W^-1 z * e^-logs - b: the inverse is again one per-pixel affine map.
        a_inv = torch.exp(-self.actnorm.logs)[:, None] * w_inv
        return ops.actnorm_invconv(z, a_inv, -self.actnorm.bias)


def squeeze2d(x: Tensor) -> Tensor:
    """[N, C, H, W] -> [N, 4C, H/2, W/2] (space to depth; H and W must be even)."""
    n, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"squeeze needs even H and W, got {tuple(x.shape)}")
    x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, c * 4, h // 2, w // 2)


def unsqueeze2d(x: Tensor) -> Tensor:
    """Inverse of squeeze2d: [N, 4C, H, W] -> [N, C, 2H, 2W]."""
    n, c, h, w = x.shape
    if c % 4:
        raise ValueError(f"unsqueeze needs a multiple of 4 channels, got {tuple(x.shape)}")
    x = x.view(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c // 4, h * 2, w * 2)


class Squeeze(nn.Module):
    """Space-to-depth reshaping (logdet 0)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(squeeze2d(x) [N, 4C, H/2, W/2], zeros [N])."""
        check_tensor("x", x, 4)
        return squeeze2d(x), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        """unsqueeze2d(y) [N, C/4, 2H, 2W]."""
        check_tensor("y", y, 4)
        return unsqueeze2d(y)


def gaussian_log_p(x: Tensor, mean: Tensor, log_sd: Tensor) -> Tensor:
    """Elementwise log N(x; mean, exp(log_sd)^2)."""
    return -0.5 * math.log(2 * math.pi) - log_sd \
        - 0.5 * (x - mean) ** 2 * torch.exp(-2 * log_sd)


class Split(nn.Module):
    """Multi-scale split with a learned prior: x = (z1, z2), p(z2 | z1) = N(mean, sd) with
    (mean, log_sd) = ZeroConv2d(z1). forward(x) -> (z1, log p(z2 | z1) [N])."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError(f"split needs an even number of channels, got {channels}")
        self.channels = channels
        self.prior = ZeroConv2d(channels // 2, channels)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(z1, z2, log p(z2 | z1) [N])."""
        _check_image("x", x, self.channels)
        check_like_model("x", x, self.prior.conv.weight)
        z1, z2 = x.chunk(2, dim=1)
        mean, log_sd = self.prior(z1).chunk(2, dim=1)
        return z1, z2, gaussian_log_p(z2, mean, log_sd).flatten(1).sum(1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(z1, log p(z2 | z1) [N]) with x = cat(z1, z2) along channels."""
        z1, _, log_p = self.encode(x)
        return z1, log_p

    def inverse(self, z1: Tensor, z2: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        """cat(z1, z2); z2 is drawn from the prior (scaled by temperature) when None."""
        half = self.channels // 2
        _check_image("z1", z1, half)
        check_like_model("z1", z1, self.prior.conv.weight)
        if z2 is None:
            if not (math.isfinite(temperature) and temperature >= 0):
                raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
            mean, log_sd = self.prior(z1).chunk(2, dim=1)
            # (drawn in row-major order: randn_like would fill a channels_last prior's output in
            # its memory order, so a channels_last model drew another sample from the same seed)
            noise = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device)
            z2 = mean + torch.exp(log_sd) * temperature * noise
        else:
            _check_image("z2", z2, half)
            check_tensor("z2", z2, like=z1)
            if z2.shape != z1.shape:
                raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
        return torch.cat([z1, z2], dim=1)
