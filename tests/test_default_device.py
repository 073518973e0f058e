"""The library under torch.set_default_device(...), which user code sets (to "cuda", often):
the data generators make their data on the CPU (their seeded CPU generators' draws would be
refused on a CUDA default device: "Expected a 'cuda' device type for generator"), and the
fits, solvers and layers make their own tensors where their inputs are, never on the default
device. Checked on this CPU with "meta" as the default device, which holds no data, so any
tensor the library made by default (a randperm with a CPU generator, a pi constant, a CPU
model's new module) fails or comes out on meta: each case must give the same values, bit for
bit, as without a default device.
"""
from __future__ import annotations

import pytest
import torch

from latentfast import geometry as geo
from latentfast.bench.geodesics import trained_digits_vae
from latentfast.data import dynamics as dyn
from latentfast.data.digits import dequantize, load_digits_images
from latentfast.data.sprites import make_sprites
from latentfast.data.toy import two_moons
from latentfast.flows import MAF, Flow, Glow, LULinear
from latentfast.ops import dynamics as dyn_ops
from latentfast.rnn import SequenceModel
from latentfast.rnn.latent import pendulum_windows
from latentfast.rnn.models import fit_sequence_model
from latentfast.vae import VAE, fit, fit_rbf_variance
from latentfast.vae.disentanglement import mig


def _cases():
    """name: a function of the inputs (made before the default device is set) -> tensors."""
    return {
        "lorenz63": lambda _: dyn.lorenz63(20, transient=5),
        "lorenz96": lambda _: dyn.lorenz96(20, n=6, transient=5),
        "pendulum": lambda _: dyn.pendulum(5, size=8)[0],
        "two_moons": lambda _: two_moons(10),
        "sprites": lambda _: make_sprites(size=8, n_scales=2, n_rotations=2, n_positions=2).images,
        "digits": lambda _: load_digits_images()[0][:5],
        "dequantize": lambda t: dequantize(t["pixels"], generator=torch.Generator().manual_seed(0)),
        "pendulum_windows": lambda _: pendulum_windows(n_traj=4, n_steps=6, size=8)[0],
        "vae fit": lambda t: torch.tensor([h["loss"] for h in fit(t["vae"], t["x"], epochs=2, progress=False)],
                                          device="cpu"),
        "fit_rbf_variance": lambda t: fit_rbf_variance(t["vae"].decoder, t["z"], t["x"][:30], n_centres=4,
                                                       steps=3).weight,
        "fit_sequence_model": lambda t: torch.tensor(fit_sequence_model(t["seq"], t["traj"], epochs=1, window=8,
                                                                        warmup=2, progress=False), device="cpu"),
        "graph geodesic": lambda t: geo.geodesic(t["z"][:2], t["z"][2:4], t["vae"].decoder, n_segments=4,
                                                 init="graph", data=t["z"], max_iter=3).curves,
        "kmedoids": lambda t: geo.kmedoids(t["dist"], 2)[0],
        "random_walk": lambda t: geo.random_walk(t["vae"].decoder, t["z"][:2], 2,
                                                 generator=torch.Generator().manual_seed(0)),
        "mig": lambda t: torch.tensor(mig(lambda f: f.flatten(1)[:, :3] + 0.1 * f.flatten(1)[:, 3:6], t["sprites"],
                                          n_points=40), device="cpu"),
        "glow log_prob": lambda t: t["glow"].log_prob(t["image"]),
        "flow sample": lambda t: t["flow"].sample(3),
        "trained_digits_vae": lambda _: trained_digits_vae(epochs=1, progress=False)[3],
        "lorenz spectrum": lambda t: dyn_ops.lorenz_lyapunov_spectrum("lorenz63", t["l0"], 3, 10)[0],
    }


def _inputs():
    torch.manual_seed(0)
    glow = Glow(1, 4, n_levels=2, steps_per_level=1, hidden=8)
    image = torch.rand(3, 1, 4, 4) - 0.5
    glow.log_prob(image)  # ActNorm's initialisation
    return {"pixels": torch.randint(0, 17, (3, 4)).float(), "vae": VAE(6, 2, (8,)), "x": torch.rand(40, 6),
            "z": torch.randn(30, 2), "seq": SequenceModel(3, 8), "traj": torch.randn(4, 30, 3),
            "dist": torch.rand(5, 5), "glow": glow,
            "sprites": make_sprites(size=8, n_scales=2, n_rotations=2, n_positions=2), "image": image,
            "flow": Flow(3, [MAF(3, 8), LULinear(3)]), "l0": torch.randn(2, 3) + torch.tensor([0.0, 0.0, 25.0])}


@pytest.mark.parametrize("name", list(_cases()))
def test_results_do_not_depend_on_the_default_device(name, default="meta"):
    inputs = _inputs()
    torch.manual_seed(0)  # the same global random state for both calls
    case = _cases()[name]
    want = case(inputs)
    inputs = _inputs()  # the same models and data, made before the default device is set
    before = torch.get_default_device()
    torch.set_default_device(default)
    try:
        torch.manual_seed(0)
        got = case(inputs)
    finally:
        torch.set_default_device(before)
    assert got.device.type == "cpu", name
    torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


def test_rbf_variance_fits_a_model_on_another_device_than_its_generator(device="cpu"):
    """fit_rbf_variance seeds its k-means with a CPU generator; with a CUDA model, the
    k-means++ draws (torch.multinomial on the model's device with that generator) raised.
    The draws are made on the generator's device: the same centres as on the CPU."""
    torch.manual_seed(0)
    vae, x, z = VAE(6, 2, (8,)), torch.rand(30, 6), torch.randn(30, 2)
    want = fit_rbf_variance(vae.decoder, z, x, n_centres=4, steps=3)
    vae = vae.to(device)
    got = fit_rbf_variance(vae.decoder, z.to(device), x.to(device), n_centres=4, steps=3)
    assert got.centres.device.type == torch.device(device).type
    torch.testing.assert_close(got.centres.cpu(), want.centres, rtol=1e-5, atol=1e-6)
