"""Training throughput of scidiff's denoisers against diffusers' equivalents.

Measures forward + backward samples/s (one training step without the optimizer)
and parameter counts, side by side in one process:

* our UNet (2-D, 64x64) vs ``diffusers.UNet2DModel`` with the same widths, blocks
  per level, attention levels, head width and FiLM (``scale_shift``) injection;
* our DiT (2-D, 64x64) vs ``diffusers.DiTTransformer2DModel`` of the same depth,
  width, heads and patch (diffusers' DiT also embeds a class label; ours is given
  no conditioning, so it does slightly less work there);
* our UNet in 3-D at 32^3 (diffusers has no 3-D equivalent).

Model sizes come from ``configs/denoiser`` (``--size tiny`` -> ``unet_tiny`` /
``dit_tiny``, ``s`` -> ``unet`` / ``dit``, ``b`` -> ``unet_b`` / ``dit_b``).
Rounds alternate between the two models of a pair so that load on a shared
machine hits both alike; the table reports the fastest round of each model
(the least disturbed by other processes).

    python workflows/benchmarks/denoiser_throughput.py --device cpu --size tiny
    python workflows/benchmarks/denoiser_throughput.py --device cuda --dtype bf16 --size s --batch 32 --json out.json

``--page docs/benchmarks/denoiser-throughput.md`` writes the table to the documentation's
benchmark page (with the date, the hardware and this command; see ``page.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = {
    "tiny": ("unet_tiny", "dit_tiny"),
    "s": ("unet", "dit"),
    "b": ("unet_b", "dit_b"),
}


@dataclass
class Result:
    name: str
    shape: str
    batch: int
    params_m: float
    samples_per_s: float
    ms_per_step: float
    peak_mem_gib: float | None


def denoiser_config(name: str, **data) -> dict:
    """The resolved ``configs/denoiser/<name>.yaml`` with the given ``data.*`` keys."""
    overrides = [f"+denoiser={name}"] + [f"+data.{k}={v}" for k, v in data.items()]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(overrides=overrides)
    return OmegaConf.to_container(cfg.denoiser, resolve=True)


def diffusers_unet(cfg: dict, channels: int, size: int):
    """``UNet2DModel`` with the widths, depths and attention levels of our UNet config."""
    from diffusers import UNet2DModel

    mult = cfg["channel_mult"]
    widths = [cfg["model_channels"] * m for m in mult]
    attn = set(cfg["attention_levels"])
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=widths,
        layers_per_block=cfg["num_res_blocks"],
        down_block_types=[
            ("AttnDownBlock2D" if i in attn else "DownBlock2D")
            for i in range(len(mult))
        ],
        up_block_types=[
            ("AttnUpBlock2D" if i in attn else "UpBlock2D")
            for i in reversed(range(len(mult)))
        ],
        attention_head_dim=cfg["head_channels"] or widths[0] // cfg["num_heads"],
        norm_num_groups=math.gcd(*widths, 32),
        resnet_time_scale_shift="scale_shift",
        add_attention=cfg["mid_attention"],
        dropout=cfg["dropout"],
    )


def diffusers_dit(cfg: dict, channels: int, size: int):
    """``DiTTransformer2DModel`` with the depth, width, heads and patch of our DiT config."""
    from diffusers import DiTTransformer2DModel

    heads = cfg["num_heads"]
    return DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=cfg["hidden_size"] // heads,
        in_channels=channels,
        out_channels=channels,
        num_layers=cfg["depth"],
        sample_size=size,
        patch_size=cfg["patch_size"],
    )


def step_fn(model, kind: str, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor):
    """One forward + backward pass; ``kind`` says which calling convention the model has."""

    def run():
        if kind == "ours":
            out = model(x, t, None)
        elif kind == "diffusers_unet":
            out = model(x, t).sample
        else:
            out = model(x, t, class_labels=labels).sample
        out.float().square().mean().backward()

    return run


def measure(models: dict, x: torch.Tensor, args) -> dict[str, Result]:
    """Time every model for ``args.rounds`` alternating rounds of ``args.steps`` steps."""
    device = x.device
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.dtype == "bf16"
        else contextlib.nullcontext()
    )
    t = torch.randint(0, 1000, (x.shape[0],), device=device)
    labels = torch.randint(0, 1000, (x.shape[0],), device=device)
    fns, times, peaks = {}, {}, {}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for name, (model, kind) in models.items():
        model.to(device).train()
        fns[name] = step_fn(model, kind, x, t, labels)
        times[name] = []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with amp:
            for _ in range(args.warmup):
                model.zero_grad(set_to_none=True)
                fns[name]()
        sync()
        peaks[name] = (
            torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        )
    for _ in range(args.rounds):
        for name, (model, _) in models.items():
            sync()
            start = time.perf_counter()
            with amp:
                for _ in range(args.steps):
                    model.zero_grad(set_to_none=True)
                    fns[name]()
            sync()
            times[name].append((time.perf_counter() - start) / args.steps)
    results = {}
    for name, (model, _) in models.items():
        sec = min(times[name])
        results[name] = Result(
            name=name,
            shape="x".join(map(str, x.shape[2:])),
            batch=x.shape[0],
            params_m=sum(p.numel() for p in model.parameters()) / 1e6,
            samples_per_s=x.shape[0] / sec,
            ms_per_step=1e3 * sec,
            peak_mem_gib=peaks[name],
        )
        model.cpu()
    return results


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16 = autocast mixed precision",
    )
    parser.add_argument(
        "--size", choices=sorted(PRESETS), default="tiny", help="denoiser preset size"
    )
    parser.add_argument(
        "--batch", type=int, default=8, help="batch size of the 2-D runs"
    )
    parser.add_argument(
        "--batch3d",
        type=int,
        default=None,
        help="batch of the 3-D run (default batch // 4)",
    )
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--size2d", type=int, default=64, help="2-D grid side")
    parser.add_argument("--size3d", type=int, default=32, help="3-D grid side")
    parser.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed steps per model (kernel selection, JIT)",
    )
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--only", choices=["unet", "dit", "unet3d"], nargs="*", default=None
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--json", type=Path, default=None, help="write the results here"
    )
    parser.add_argument(
        "--page",
        type=Path,
        default=None,
        help="write the documentation's benchmark page here "
        "(docs/benchmarks/denoiser-throughput.md)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    unet_name, dit_name = PRESETS[args.size]
    only = set(args.only or ["unet", "dit", "unet3d"])
    c, s2, s3 = args.channels, args.size2d, args.size3d
    rows: list[tuple[str, Result, Result | None]] = []

    if "unet" in only:
        cfg = denoiser_config(unet_name, channels=c, dims=2)
        ours = instantiate(cfg)
        theirs = diffusers_unet(cfg, c, s2)
        x = torch.randn(args.batch, c, s2, s2, device=device)
        r = measure(
            {
                "scidiff UNet": (ours, "ours"),
                "diffusers UNet2DModel": (theirs, "diffusers_unet"),
            },
            x,
            args,
        )
        rows.append(
            (f"UNet-2D {unet_name}", r["scidiff UNet"], r["diffusers UNet2DModel"])
        )
        del ours, theirs
    if "dit" in only:
        cfg = denoiser_config(dit_name, channels=c, dims=2)
        ours = instantiate(cfg)
        theirs = diffusers_dit(cfg, c, s2)
        x = torch.randn(args.batch, c, s2, s2, device=device)
        r = measure(
            {"scidiff DiT": (ours, "ours"), "diffusers DiT": (theirs, "diffusers_dit")},
            x,
            args,
        )
        rows.append(
            (
                f"DiT-2D {dit_name}/p{cfg['patch_size']}",
                r["scidiff DiT"],
                r["diffusers DiT"],
            )
        )
        del ours, theirs
    if "unet3d" in only:
        cfg = denoiser_config(unet_name, channels=c, dims=3)
        ours = instantiate(cfg)
        b3 = args.batch3d or max(1, args.batch // 4)
        x = torch.randn(b3, c, s3, s3, s3, device=device)
        r = measure({"scidiff UNet-3D": (ours, "ours")}, x, args)
        rows.append((f"UNet-3D {unet_name}", r["scidiff UNet-3D"], None))
        del ours

    hardware = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{cpu_name()}, {torch.get_num_threads()} torch threads"
    )
    print(
        f"\ndenoiser throughput: forward+backward, {args.dtype}, device {device} ({hardware}), torch {torch.__version__}"
    )
    header = f"{'model':<26}{'grid':>10}{'batch':>6}{'params M':>14}{'ours smp/s':>12}{'diffusers smp/s':>17}{'ours/diffusers':>16}"
    if device.type == "cuda":
        header += f"{'mem GiB ours/diff':>19}"
    print(header)
    print("-" * len(header))
    for label, ours, theirs in rows:
        ratio = f"{ours.samples_per_s / theirs.samples_per_s:.2f}" if theirs else "-"
        their_sps = f"{theirs.samples_per_s:.2f}" if theirs else "-"
        params = f"{ours.params_m:.2f}" + (f"/{theirs.params_m:.2f}" if theirs else "")
        line = f"{label:<26}{ours.shape:>10}{ours.batch:>6}{params:>14}{ours.samples_per_s:>12.2f}{their_sps:>17}{ratio:>16}"
        if device.type == "cuda":
            mem = f"{ours.peak_mem_gib:.2f}" + (
                f"/{theirs.peak_mem_gib:.2f}" if theirs else ""
            )
            line += f"{mem:>19}"
        print(line)
    if args.json:
        payload = {
            "device": str(device),
            "hardware": hardware,
            "dtype": args.dtype,
            "size": args.size,
            "torch": torch.__version__,
            "rows": [
                {
                    "model": label,
                    "ours": asdict(o),
                    "diffusers": asdict(d) if d else None,
                    "ratio": (o.samples_per_s / d.samples_per_s) if d else None,
                }
                for label, o, d in rows
            ],
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    if args.page:
        write_benchmark_page(args, argv, device, rows)
    return 0


def write_benchmark_page(args, argv, device: torch.device, rows) -> Path:
    """The documentation's benchmark page: the printed table in markdown (``page.py``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from page import command, hardware, markdown_table, software, write_page

    cuda = device.type == "cuda"
    header = ["model", "grid", "batch", "params (M) ours / diffusers", "scidiff samples/s",
              "diffusers samples/s", "ratio"] + (["peak GiB ours / diffusers"] if cuda else [])
    table = []
    for label, ours, theirs in rows:
        cells = [
            label,
            ours.shape,
            ours.batch,
            f"{ours.params_m:.2f}" + (f" / {theirs.params_m:.2f}" if theirs else ""),
            f"{ours.samples_per_s:.2f}",
            f"{theirs.samples_per_s:.2f}" if theirs else "-",
            f"**{ours.samples_per_s / theirs.samples_per_s:.2f}**" if theirs else "-",
        ]
        if cuda:
            cells.append(f"{ours.peak_mem_gib:.2f}" + (f" / {theirs.peak_mem_gib:.2f}" if theirs else ""))
        table.append(cells)
    extra = {}
    if "diffusers" in sys.modules:
        extra["diffusers"] = sys.modules["diffusers"].__version__
    summary = (
        "One training step (forward + backward, no optimizer) of scidiff's denoisers against "
        "diffusers' equivalents with the same widths, blocks per level, attention levels, head "
        "width and scale-shift injection (UNet), or the same depth, width, heads and patch (DiT); "
        f"and scidiff's 3-D UNet. Preset `--size {args.size}`, {args.dtype}, device `{device}`. "
        f"Rounds of the two models of a pair alternate ({args.rounds} rounds of {args.steps} steps "
        f"after {args.warmup} untimed ones); the fastest round of each model is reported, in samples/s."
    )
    return write_page(
        args.page,
        "Denoiser throughput",
        summary,
        command(__file__, sys.argv[1:] if argv is None else argv),
        markdown_table(header, table),
        hardware_line=hardware(str(device)),
        software_line=software(extra),
    )


if __name__ == "__main__":
    sys.exit(main())
