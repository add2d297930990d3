"""What latent diffusion saves: the same denoiser configuration on the field and on the
autoencoder's latent, sampling and training, and our autoencoder next to diffusers'.

Configurations are the experiments' own, composed with Hydra: ``experiment=voxels`` against
``experiment=voxels_latent`` with ``experiment=voxels_autoencoder``'s autoencoder (4 x 32^3
densities, 3 parameters; latent 4 x 16^3), and the same for ``grf`` (64 x 64; latent
4 x 16 x 16). Weights are random: the figures are throughput only (quality needs trained
models: ``workflows/latent_quality.py``).

* **sampling**: ensemble members per second, DDIM with ``--steps`` denoiser calls on a batch of
  ``--members``, for the latent model including the decoding of every member;
* **training**: one optimiser step (forward and backward) on a batch of ``--batch``, for the
  latent model including the encoding of the batch;
* **autoencoder**: encode + decode of a batch by :class:`scidiff.nets.FieldAutoencoder` and by
  diffusers' ``AutoencoderKL`` (2-D only) at equal widths, depth and latent channels.

Alternating rounds in one process, the best of ``--rounds``.

    python workflows/benchmarks/latent_speed.py --page docs/benchmarks/latent-diffusion.md
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import hydra.utils as hu
import torch
from omegaconf import OmegaConf

from scidiff.cli.compose import compose_config
from scidiff.conditioning import Conditioning
from scidiff.inference.generation import DDIM, sample_model
from scidiff.nets.latent import LatentCodec

CASES = {"voxels": (4, (32, 32, 32), 3), "grf": (1, (64, 64), 2)}  # channels, grid, parameters


def build(experiment: str, channels: int, grid: tuple[int, ...], params: int):
    """(field denoiser, latent denoiser, codec, diffusion) of the experiment's configs."""
    plain = compose_config("train", [f"experiment={experiment}"])
    latent = compose_config("train", [f"experiment={experiment}_latent", "latent.autoencoder=none"])
    ae_cfg = compose_config("train", [f"experiment={experiment}_autoencoder"])
    kw = dict(dims=len(grid), num_params=params, field_channels=0)
    autoencoder = hu.instantiate(OmegaConf.to_container(ae_cfg.autoencoder, resolve=True), in_channels=channels,
                                 dims=len(grid))
    codec = LatentCodec(autoencoder)
    lat_channels = codec.latent_channels
    field = hu.instantiate(OmegaConf.to_container(plain.denoiser, resolve=True), in_channels=channels, **kw)
    lat = hu.instantiate(OmegaConf.to_container(latent.denoiser, resolve=True), in_channels=lat_channels, **kw)
    diffusion = hu.instantiate(OmegaConf.to_container(plain.diffusion, resolve=True))
    return field.eval(), lat.eval(), codec.eval(), diffusion


def best(fn: Callable[[], None], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--steps", type=int, default=10, help="DDIM denoiser calls per member")
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--page", type=Path, default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows, ae_rows = [], []
    for name in args.cases:
        channels, grid, nparams = CASES[name]
        field, lat, codec, diffusion = build(name, channels, grid, nparams)
        zshape = codec.latent_shape(grid)
        cond = Conditioning(params=torch.randn(args.members, nparams))
        sampler = DDIM(steps=args.steps)

        @torch.no_grad()
        def sample_field():
            sample_model(field, diffusion, torch.randn(args.members, channels, *grid), cond, sampler=sampler)

        @torch.no_grad()
        def sample_latent():
            z = sample_model(lat, diffusion, torch.randn(args.members, *zshape), cond, sampler=sampler)
            codec.decode(z)

        x = torch.randn(args.batch, channels, *grid)
        tcond = Conditioning(params=torch.randn(args.batch, nparams))
        opt_f = torch.optim.AdamW(field.parameters(), lr=1e-5)
        opt_l = torch.optim.AdamW(lat.parameters(), lr=1e-5)

        def step(net, opt, x0):
            t = diffusion.sample_timesteps(x0.shape[0], x0.device)
            loss = diffusion.training_loss(net, x0, tcond, None, t=t, noise=torch.randn_like(x0)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def train_field():
            step(field, opt_f, x)

        def train_latent():
            step(lat, opt_l, codec.encode(x))

        field.train(), lat.train()
        train_field(), train_latent()  # warm-up
        t_train_f = t_train_l = float("inf")
        for _ in range(args.rounds):
            t_train_f = min(t_train_f, best(train_field, 1))
            t_train_l = min(t_train_l, best(train_latent, 1))
        field.eval(), lat.eval()
        sample_latent()
        t_s_f = t_s_l = float("inf")
        for _ in range(args.rounds):
            t_s_f = min(t_s_f, best(sample_field, 1))
            t_s_l = min(t_s_l, best(sample_latent, 1))
        mps_f, mps_l = args.members / t_s_f, args.members / t_s_l
        grid_s = "x".join(map(str, (channels, *grid)))
        lat_s = "x".join(map(str, zshape))
        rows.append([f"{name} {grid_s} -> latent {lat_s}", f"{mps_f:.3g}", f"{mps_l:.3g}", f"{mps_l / mps_f:.1f}",
                     f"{t_train_f:.3g}", f"{t_train_l:.3g}", f"{t_train_f / t_train_l:.1f}"])
        print(f"{name}: sampling {mps_f:.3g} -> {mps_l:.3g} members/s ({mps_l / mps_f:.1f}x); training step "
              f"{t_train_f:.3g} -> {t_train_l:.3g} s ({t_train_f / t_train_l:.1f}x)", flush=True)
        if len(grid) == 2:
            ae_rows += compare_autoencoders(codec.autoencoder, channels, grid, args)
    if args.page:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from page import command, hardware, markdown_table, software, write_page

        import diffusers

        summary = (
            "The same denoiser configuration (each experiment's, composed with Hydra; random weights: throughput "
            f"only) on the field and on its autoencoder's latent. Sampling: members per second, DDIM with "
            f"{args.steps} denoiser calls on {args.members} members, the latent model including the decoding. "
            f"Training: one AdamW step on a batch of {args.batch}, the latent model including the encoding. "
            f"Best of {args.rounds} alternating rounds in one process."
        )
        table = markdown_table(["case", "field members/s", "latent members/s", "sampling speed-up",
                                "field step (s)", "latent step (s)", "training speed-up"], rows)
        if ae_rows:
            table += "\n\nThe autoencoder against diffusers' `AutoencoderKL` (2-D only), equal widths, depth and " \
                     f"latent channels, encode + decode of {args.batch} fields:\n\n" + markdown_table(
                         ["autoencoder", "parameters (M)", "encode + decode (s)", "ratio to diffusers"], ae_rows)
        write_page(args.page, "Latent diffusion: speed", summary,
                   command(__file__, sys.argv[1:] if argv is None else argv), table,
                   hardware_line=hardware(), software_line=software({"diffusers": diffusers.__version__}))


def compare_autoencoders(ours, channels: int, grid: tuple[int, ...], args) -> list[list[str]]:
    """Encode + decode time of ours and diffusers' AutoencoderKL at equal widths and latent channels."""
    from diffusers import AutoencoderKL

    levels = len(ours.encoder) and int(max(ours.downsample)).bit_length() - 1
    widths = [ours.encoder[0].conv.out_channels * m for m in [min(2**i, 4) for i in range(levels + 1)]]
    theirs = AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=ours.latent_channels,
                           down_block_types=("DownEncoderBlock2D",) * (levels + 1),
                           up_block_types=("UpDecoderBlock2D",) * (levels + 1), block_out_channels=tuple(widths),
                           layers_per_block=1, norm_num_groups=32).eval()
    x = torch.randn(args.batch, channels, *grid)

    @torch.no_grad()
    def run_ours():
        ours.decode(ours.encode(x).mean)

    @torch.no_grad()
    def run_theirs():
        theirs.decode(theirs.encode(x).latent_dist.mean)

    run_ours(), run_theirs()
    t_o = t_t = float("inf")
    for _ in range(args.rounds):
        t_o = min(t_o, best(run_ours, 1))
        t_t = min(t_t, best(run_theirs, 1))
    n_o = sum(q.numel() for q in ours.parameters()) / 1e6
    n_t = sum(q.numel() for q in theirs.parameters()) / 1e6
    print(f"autoencoder {grid}: ours {t_o:.3g} s ({n_o:.2f} M), diffusers {t_t:.3g} s ({n_t:.2f} M)", flush=True)
    return [[f"scidiff FieldAutoencoder {'x'.join(map(str, grid))}", f"{n_o:.2f}", f"{t_o:.3g}", f"{t_o / t_t:.2f}"],
            [f"diffusers AutoencoderKL {'x'.join(map(str, grid))}", f"{n_t:.2f}", f"{t_t:.3g}", "1.00"]]


if __name__ == "__main__":
    main()
