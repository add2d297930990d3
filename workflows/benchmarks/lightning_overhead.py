"""Lightning's per-step overhead: ``DiffusionModule`` under ``lightning.Trainer`` against a
plain PyTorch loop doing the same work on the same model.

Both take identical steps: the same denoiser (``configs/denoiser/<preset>``), AdamW,
``GaussianDiffusion.training_loss`` on the same in-memory batches, and the EMA update
after every optimizer step. The Trainer runs as ``scidiff-train`` configures it for a
step (loss logged every step, gradient clipping), without validation, checkpoints or
progress bar (their cost is the user's choice of frequency, not per-step overhead).
The time per step is measured between step ``--warmup`` and the last step, so start-up
(process group, data module setup) is excluded. Rounds alternate between the two
loops; the table reports each loop's median round and the ratio.

    python workflows/benchmarks/lightning_overhead.py --steps 60 --rounds 5
    python workflows/benchmarks/lightning_overhead.py --device cuda --preset unet --size 64 --batch 64

``--page docs/benchmarks/lightning-overhead.md`` writes the result to the documentation's
benchmark page (with the date, the hardware and this command; see ``page.py``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from scidiff.diffusion import GaussianDiffusion, NoiseSchedule
from scidiff.training import EMA, DiffusionModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def make_denoiser(preset: str, dims: int, seed: int) -> torch.nn.Module:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(overrides=[f"+denoiser={preset}", f"+data.dims={dims}"])
    torch.manual_seed(seed)
    return instantiate(OmegaConf.to_container(cfg.denoiser, resolve=True))


class Timer(L.Callback):
    """Wall time from the start of batch ``warmup`` to the end of the last batch."""

    def __init__(self, warmup: int, sync) -> None:
        self.warmup, self.sync = warmup, sync
        self.t0 = self.t1 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.sync()
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.sync()
        self.t1 = time.perf_counter()


def loader(data: torch.Tensor, batch: int) -> DataLoader:
    return DataLoader(TensorDataset(data), batch_size=batch, shuffle=False, drop_last=True,
                      collate_fn=lambda items: {"x": torch.stack([i[0] for i in items])})


def plain_loop(args, data, diffusion, sync) -> float:
    device = torch.device(args.device)
    net = make_denoiser(args.preset, args.dims, args.seed).to(device)
    ema = EMA(net, 0.999, 10).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-4)
    g = torch.Generator(device=device).manual_seed(args.seed)
    t0 = 0.0
    for step, batch in enumerate(loader(data, args.batch)):
        if step == args.warmup:
            sync()
            t0 = time.perf_counter()
        x = batch["x"].to(device, non_blocking=True)
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device, generator=g)
        noise = torch.randn(x.shape, device=device, generator=g)
        loss = diffusion.training_loss(net, x, None, None, t=t, noise=noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema.update(net)
        _ = loss.detach()  # what self.log keeps
        if step + 1 == args.steps:
            break
    sync()
    return (time.perf_counter() - t0) / (args.steps - args.warmup)


def lightning_loop(args, data, diffusion, sync) -> float:
    net = make_denoiser(args.preset, args.dims, args.seed)
    module = DiffusionModule(net, diffusion, optimizer=lambda params: torch.optim.AdamW(params, lr=2e-4),
                             ema_decay=0.999, ema_warmup=10, seed=args.seed)
    timer = Timer(args.warmup, sync)
    trainer = L.Trainer(
        accelerator="cuda" if args.device.startswith("cuda") else "cpu", devices=1, max_steps=args.steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0, callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader(data, args.batch))
    return (timer.t1 - timer.t0) / (args.steps - args.warmup)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="unet_tiny", help="configs/denoiser/<preset>.yaml")
    p.add_argument("--dims", type=int, default=2)
    p.add_argument("--size", type=int, default=32, help="grid points per axis")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--page", type=Path, default=None,
                   help="write the documentation's benchmark page here (docs/benchmarks/lightning-overhead.md)")
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging
    import warnings

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    diffusion = GaussianDiffusion(NoiseSchedule.from_name("linear", num_timesteps=1000))
    gen = torch.Generator().manual_seed(args.seed)
    data = torch.randn(args.steps * args.batch, 1, *([args.size] * args.dims), generator=gen)
    plain, light = [], []
    for r in range(args.rounds):
        plain.append(plain_loop(args, data, diffusion, sync))
        light.append(lightning_loop(args, data, diffusion, sync))
        print(f"round {r}: plain {plain[-1] * 1e3:.2f} ms/step, lightning {light[-1] * 1e3:.2f} ms/step", flush=True)
    mp, ml = statistics.median(plain), statistics.median(light)
    result = {
        "preset": args.preset, "shape": [args.batch, 1, *([args.size] * args.dims)], "device": args.device,
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "lightning": L.__version__,
        "plain_ms_per_step": round(mp * 1e3, 3), "lightning_ms_per_step": round(ml * 1e3, 3),
        "overhead_percent": round((ml / mp - 1.0) * 100, 2),
        "rounds_plain_ms": [round(v * 1e3, 3) for v in plain], "rounds_lightning_ms": [round(v * 1e3, 3) for v in light],
    }
    print(f"{args.preset} {result['shape']} on {args.device} ({result['threads']} threads): "
          f"plain {result['plain_ms_per_step']:.2f} ms/step, Lightning {result['lightning_ms_per_step']:.2f} ms/step, "
          f"overhead {result['overhead_percent']:+.1f} %")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.page:
        write_benchmark_page(args, argv, result)
    return 0


def write_benchmark_page(args, argv, result: dict) -> Path:
    """The documentation's benchmark page: the medians and every round (``page.py``)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from page import command, hardware, markdown_table, software, write_page

    shape = "x".join(map(str, result["shape"][2:]))
    table = markdown_table(
        ["preset", "batch x grid", "device", "torch threads", "plain PyTorch ms/step", "Lightning ms/step",
         "overhead"],
        [[args.preset, f"{result['shape'][0]} x {shape}", args.device, result["threads"],
          f"{result['plain_ms_per_step']:.1f}", f"{result['lightning_ms_per_step']:.1f}",
          f"**{result['overhead_percent']:+.1f} %**"]],
    )
    rounds = markdown_table(
        ["round", "plain ms/step", "Lightning ms/step"],
        [[i, f"{a:.1f}", f"{b:.1f}"]
         for i, (a, b) in enumerate(zip(result["rounds_plain_ms"], result["rounds_lightning_ms"]))],
    )
    summary = (
        "The cost of running a training step under `lightning.Trainer` rather than in a plain PyTorch "
        f"loop doing the same work: the same `{args.preset}` denoiser, AdamW, gradient clipping, the EMA "
        "update and the loss logged every step, on the same in-memory batches; no validation, checkpoints "
        f"or progress bar. Each round times steps {args.warmup} to {args.steps} of each loop; the loops "
        f"alternate for {args.rounds} rounds and the median round of each is reported."
    )
    return write_page(
        args.page, "Lightning's cost per step", summary,
        command(__file__, sys.argv[1:] if argv is None else argv),
        f"Medians of {args.rounds} rounds:\n\n{table}\n\nEvery round:\n\n{rounds}",
        hardware_line=hardware(args.device), software_line=software({"lightning": L.__version__}),
    )


if __name__ == "__main__":
    raise SystemExit(main())
