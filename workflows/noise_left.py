"""Where a trained model fails to denoise: the noise it leaves, by scale and noise level.

For held-out fields x0 of a run's data, noised to x_t = alpha_t x0 + sigma_t eps at a few
timesteps, the model's x0 prediction has the error x0_hat - x0. Along the last spatial axis
(periodic, e.g. longitude) its power at wavenumber k over the power of the noise sigma_t /
alpha_t eps is the fraction of the noise left there, as an amplitude ratio. The exact denoiser
of a stationary Gaussian field leaves S_k / sqrt(S_k^2 + N_k^2) (S, N: the field's and the
noise's amplitudes at k; tested in tests/workflows/test_noise_left.py): all the noise where the
field dominates, almost none where the noise does (a conditional model can leave less, where
the condition predicts the field). A model that leaves much
more at scales where the field is weak passes it on along the sampler's path: on smooth fields
it shows as grain. The next line is that grain: the standard deviation of the part of members
and of real fields above a wavenumber (DPM-Solver++ 2M, 20 calls, one member per field). The
last table says which noise levels make it: deterministic DDIM through every timestep, started
from the held-out fields noised to t0 instead of from pure noise, so only the levels below t0
act (on a few of the fields, ``--restart-fields``: a start at t0 costs t0 + 1 denoiser calls); an
exact denoiser returns fields with the real fields' small scales from any t0.

    python workflows/noise_left.py outputs/climate/base outputs/climate/other --data-path climate_small.zarr
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from scidiff.conditioning import Conditioning
from scidiff.diffusion.samplers import ddim_sample
from scidiff.evaluation import EvaluationError
from scidiff.evaluation.data import build_datamodule
from scidiff.inference import DPMSolver, generate, load_pretrained

WAVENUMBERS = (1, 2, 4, 8, 16, 24, 32)


def held_out(model, data_path: Path, split: str, count: int) -> dict:
    """``count`` fields of ``split``, evenly spread over it, as the run's data module reads them."""
    ds = build_datamodule(model, data_path).datasets[split]
    picks = np.asarray(ds.indices)[np.linspace(0, len(ds) - 1, min(count, len(ds))).astype(int)]
    return ds.read_batch(picks)


def zonal_power(x: torch.Tensor) -> torch.Tensor:
    """Power per wavenumber along the last axis, averaged over everything else."""
    return (torch.fft.rfft(x.double(), dim=-1).abs() ** 2).mean(tuple(range(x.ndim - 1)))


def noise_left(denoiser, diffusion, x0: torch.Tensor, cond, timesteps, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(left, signal_to_noise, sigma/alpha), the first two ``[len(timesteps), n // 2 + 1]``: by timestep
    and wavenumber along the last axis, the amplitude of ``denoiser``'s x0 error over the noise's, and the
    fields' amplitude over the noise's."""
    ab = diffusion.schedule.alphas_cumprod.double()
    signal = zonal_power(x0)
    left, sn, scales = [], [], []
    for t in timesteps:
        tt = torch.full((x0.shape[0],), t, dtype=torch.long)
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(x0.dtype)
        x_t = diffusion.q_sample(x0, tt, eps)
        with torch.no_grad():
            x0_hat, _ = diffusion.predictions(diffusion.model_output(denoiser, x_t, tt, cond), x_t, tt)
        scale = (1 - ab[t]).sqrt() / ab[t].sqrt()
        noise = zonal_power(eps * scale)
        left.append((zonal_power(x0_hat - x0) / noise).sqrt())
        sn.append((signal / noise).sqrt())
        scales.append(scale)
    return torch.stack(left), torch.stack(sn), torch.stack(scales)


def restarted(model, x0: torch.Tensor, cond, t0: int, generator: torch.Generator) -> torch.Tensor:
    """Physical fields from deterministic DDIM through every timestep from ``t0`` down to 0 (close to the
    probability-flow ODE, so the solver adds almost no error of its own), started from ``x0`` noised to
    ``t0``: what the levels at and below ``t0`` make of real fields."""
    d = model.diffusion
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(x0.dtype)
    x_t = d.q_sample(x0, torch.full((x0.shape[0],), t0, dtype=torch.long), eps)
    grid = list(range(t0, -1, -1))
    x = ddim_sample(model.denoiser, d, x_t, cond=cond, timesteps=grid)
    return model.to_physical(x.double()).float()


def high_pass_std(x: torch.Tensor, k0: int) -> float:
    f = torch.fft.rfft(x.double(), dim=-1)
    f[..., :k0] = 0
    return float(torch.fft.irfft(f, n=x.shape[-1], dim=-1).std())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (or checkpoints)")
    p.add_argument("--data-path", type=Path, required=True, help="the runs' data store")
    p.add_argument("--split", default="test")
    p.add_argument("--fields", type=int, default=64, help="held-out fields")
    p.add_argument("--timesteps", type=int, nargs="+", default=[0, 10, 30, 100, 300, 700])
    p.add_argument("--restart-fields", type=int, default=16,
                   help="held-out fields of the last table (DDIM through every timestep: the slow part; 0: no table)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for run in args.runs:
        model = load_pretrained(run)
        if model.is_latent:
            p.error(f"{run} is a latent diffusion model: its noise is added to the latent, not to the field")
        try:
            batch = held_out(model, args.data_path, args.split, args.fields)
        except EvaluationError as exc:
            p.error(str(exc))
        if "mask" in batch and not bool(batch["mask"].all()):
            p.error(f"{run}: the fields of {args.data_path} have missing points (NaN); their spectra are undefined")
        x0 = batch["x"].float()
        ks = [k for k in WAVENUMBERS if k <= x0.shape[-1] // 2]
        params = batch.get("params")
        fields = batch.get("fields")
        cond = Conditioning(params=None if params is None or params.shape[1] == 0 else params.float(),
                            fields=None if fields is None else fields.float())
        gen = torch.Generator().manual_seed(args.seed)
        left, sn, scales = noise_left(model.denoiser, model.diffusion, x0, cond, args.timesteps, gen)
        print(f"\n{run}: fraction of the noise left in the x0 prediction (amplitude), by wavenumber k along "
              f"the last axis; S/N: the field's amplitude over the noise's")
        top = [ks[-3], ks[-1]] if len(ks) >= 3 else ks  # where the field's signal-to-noise ratio is shown
        print(f"| t | sigma/alpha | {' | '.join(f'k={k}' for k in ks)} | S/N at k={', '.join(map(str, top))} |")
        print(f"|{'---|' * (len(ks) + 3)}")
        for i, t in enumerate(args.timesteps):
            print(f"| {t} | {float(scales[i]):.4f} | {' | '.join(f'{float(left[i, k]):.3f}' for k in ks)} | "
                  f"{', '.join(f'{float(sn[i, k]):.3f}' for k in top)} |")
        phys_params = None
        if cond.params is not None:
            phys_params = model.statistics.param_transform().inverse(params.double()).float()
        members = generate(model, phys_params, list(range(x0.shape[0])), sampler=DPMSolver(steps=20, order=2),
                           fields=fields)
        truth = model.to_physical(x0.double()).float()
        cuts = [k0 for k0 in (8, 16) if k0 <= x0.shape[-1] // 2]
        print("std above wavenumber k0 (physical units): " + ", ".join(
            f"k0={k0}: members {high_pass_std(members, k0):.3f}, real {high_pass_std(truth, k0):.3f}"
            for k0 in cuts), flush=True)
        if args.restart_fields < 1:
            continue
        # each start runs t0 + 1 denoiser calls: a few of the fields, spread over the split as they are
        few = torch.from_numpy(np.linspace(0, x0.shape[0] - 1, min(args.restart_fields, x0.shape[0])).astype(int))
        sub = cond.map(lambda t: t[few])
        print(f"\nstarted from the held-out fields noised to t0 (DDIM through every timestep, {few.numel()} of "
              f"the fields): std above wavenumber k0 (physical units)")
        print(f"| t0 | {' | '.join(f'k0={k0}' for k0 in cuts)} |\n|{'---|' * (len(cuts) + 1)}")
        print(f"| real fields | {' | '.join(f'{high_pass_std(truth[few], k0):.3f}' for k0 in cuts)} |")
        for t0 in sorted(set(args.timesteps) | {model.diffusion.num_timesteps - 1}):
            out = restarted(model, x0[few], sub, t0, torch.Generator().manual_seed(args.seed))
            print(f"| {t0} | {' | '.join(f'{high_pass_std(out, k0):.3f}' for k0 in cuts)} |", flush=True)


if __name__ == "__main__":
    main()
