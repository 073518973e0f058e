"""The "climate" check: a GRU trained on Lorenz-63 and the Lyapunov spectrum of its
closed-loop dynamics, against the true spectrum (0.906, 0, -14.572)."""
from __future__ import annotations

import time

import torch

from latentfast.data import dynamics as D
from latentfast.data._cpu import made_on_cpu
from latentfast.rnn.models import SequenceModel, fit_sequence_model, valid_prediction_time

LORENZ63_SPECTRUM = (0.906, 0.0, -14.572)


@made_on_cpu
def lorenz_climate(hidden: int = 128, epochs: int = 150, dt: float = 0.02, seed: int = 0,
                   progress: bool = True) -> dict:
    """Train on 6 normalised Lorenz-63 trajectories (3000 steps of dt each), then report the
    closed-loop Lyapunov spectrum (per unit time; the map is invariant to the
    normalisation) and the valid prediction time on 2 held-out trajectories. The global
    random state is left as it was (the model is initialised from `seed` inside
    torch.random.fork_rng)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _lorenz_climate(hidden, epochs, dt, seed, progress)


def _lorenz_climate(hidden: int, epochs: int, dt: float, seed: int, progress: bool) -> dict:
    traj = D.lorenz63(3000, dt=dt, n_traj=8, seed=seed).float()
    mean, std = traj.mean((0, 1)), traj.std((0, 1))
    data = (traj - mean) / std
    model = SequenceModel(3, hidden=hidden)
    t0 = time.perf_counter()
    hist = fit_sequence_model(model, data[:6], epochs=epochs, window=64, batch_size=64, seed=seed,
                              progress=progress)
    train_s = time.perf_counter() - t0
    test = data[6:]
    forecast, _ = model.forecast(test[:, :200], 600)
    vpt = valid_prediction_time(forecast, test[:, 200:800], torch.ones(3))
    _, hs = model.forecast(test[:, :200], 500)
    le = model.lyapunov_spectrum(hs[:, -1], 3, 5000, dt=dt, qr_every=5).mean(0)
    return {
        "hidden": hidden, "epochs": epochs, "dt": dt, "train_s": round(train_s, 1),
        "final_loss": hist[-1],
        "lyapunov": [round(v, 4) for v in le.tolist()],
        "true_lyapunov": list(LORENZ63_SPECTRUM),
        "leading_rel_err": abs(le[0].item() - LORENZ63_SPECTRUM[0]) / LORENZ63_SPECTRUM[0],
        "valid_prediction_lyapunov_times": [round(v * dt * LORENZ63_SPECTRUM[0], 3) for v in vpt.tolist()],
    }
