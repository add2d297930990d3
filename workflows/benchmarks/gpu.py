"""The fast paths on one GPU, against diffusers, in one process: one table per question.

1. **Training step** (forward + backward, no optimizer) of our UNet and DiT at two preset sizes
   (``--sizes s,b``: ``configs/denoiser/unet.yaml`` / ``unet_b`` and ``dit`` / ``dit_b``) against
   diffusers' ``UNet2DModel`` and ``DiTTransformer2DModel`` of equal configuration
   (``denoiser_throughput.py`` builds the pairs), each in fp32, bf16 autocast and bf16 +
   ``torch.compile``. Rounds alternate between all variants of a pair; the best round is
   reported in samples/s with the peak memory, and the graphs compiled after warm-up
   (recompilations; 0 expected).
2. **Model FLOP utilisation** of the DiT (and the UNet): the FLOPs of one step counted by
   ``torch.utils.flop_counter`` over the step time, against the device's dense bf16 peak
   (``--peak-tflops``; known for H100/H200 and A100).
3. **Sampling**: ensemble members/s of batched generation (:func:`scidiff.inference.sample_model`)
   with DDIM-50 and DPM-Solver++ 2M at 20 calls, fp32 against bf16 + compile, for the UNet S at
   64x64 and for the quickstart's UNet at 16x16 (whose CPU rate, ``--cpu-rate``, is on the
   sampling-throughput page), with the recompilations over the whole run.
4. **3-D UNet at 64^3**: training samples/s and peak memory, bf16, with and without activation
   checkpointing.
5. **Attention kernels**: whether CUDA's flash and memory-efficient SDPA kernels each accept
   every attention call of both denoisers in bf16.

    python workflows/benchmarks/gpu.py --json gpu.json --page gpu.md    # the tables as a benchmark page
    bash workflows/benchmarks/gpu.sh          # this, then a trainer=fsdp run, within ~8 minutes

Weights are random (throughput only). Results are printed section by section and the JSON is
rewritten after each, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from denoiser_throughput import denoiser_config, diffusers_dit, diffusers_unet, step_fn  # noqa: E402

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0}
PRESETS = {"tiny": ("unet_tiny", "dit_tiny"), "s": ("unet", "dit"), "b": ("unet_b", "dit_b")}
MODES = ("fp32", "bf16", "bf16+compile")


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


class Timer:
    """Wall time of device work (synchronising CUDA) and the peak memory of what ran since ``reset``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None


def graphs_compiled() -> int:
    """Graphs dynamo has compiled so far in this process (first compilations and recompilations)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def autocast(device: torch.device, mode: str):
    if mode.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_step(model, kind: str, x, t, labels, mode: str, backend: str) -> Callable[[], None]:
    """One forward + backward of ``model`` (our calling convention or diffusers', ``step_fn`` of
    ``denoiser_throughput.py``), under ``mode``."""
    call = model
    if mode.endswith("compile"):
        if kind == "ours":
            from scidiff.nets.execution import Accelerated, Execution

            call = Accelerated(model, Execution(compile=True, backend=backend), x.ndim - 2)
        else:
            call = torch.compile(model, backend=backend)
    step = step_fn(call, kind, x, t, labels)

    def run():
        model.zero_grad(set_to_none=True)
        with autocast(x.device, mode):
            step()

    return run


def race(variants: dict[str, Callable[[], None]], timer: Timer, args) -> dict[str, dict]:
    """Warm every variant up (its peak memory measured there), then alternate timed rounds."""
    out: dict[str, dict] = {}
    for name, fn in variants.items():
        timer.reset_peak()
        for _ in range(args.warmup):
            fn()
        timer.sync()
        out[name] = {"peak_gib": timer.peak_gib(), "times": []}
    before = graphs_compiled()
    for _ in range(args.rounds):
        for name, fn in variants.items():
            timer.sync()
            tic = time.perf_counter()
            for _ in range(args.steps):
                fn()
            timer.sync()
            out[name]["times"].append((time.perf_counter() - tic) / args.steps)
    recompiled = graphs_compiled() - before
    for rec in out.values():
        rec["seconds"] = min(rec.pop("times"))
        rec["recompiled_after_warmup"] = recompiled
    return out


def step_flops(fn: Callable[[], None]) -> float:
    """FLOPs of one call of ``fn`` (matrix products, convolutions, attention), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def params_m(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


# ------------------------------------------------------------------------------------ sections
def training_section(args, device, timer, report) -> None:
    from hydra.utils import instantiate

    c, s = args.channels, args.grid
    rows = []
    for size in args.sizes:
        unet_name, dit_name = PRESETS[size]
        for label, name, make_theirs, kind in (("UNet", unet_name, diffusers_unet, "diffusers_unet"),
                                               ("DiT", dit_name, diffusers_dit, "diffusers_dit")):
            cfg = denoiser_config(name, channels=c, dims=2)
            torch.manual_seed(0)
            ours = instantiate(cfg).to(device).train()
            theirs = make_theirs(cfg, c, s).to(device).train()
            x = torch.randn(args.batch, c, s, s, device=device)
            t = torch.randint(0, 1000, (args.batch,), device=device)
            labels = torch.randint(0, 1000, (args.batch,), device=device)
            modes = [m for m in args.modes if not m.endswith("compile") or size in args.compile_sizes]
            variants = {}
            for mode in modes:
                variants[f"ours {mode}"] = training_step(ours, "ours", x, t, labels, mode, args.compile_backend)
                variants[f"diffusers {mode}"] = training_step(theirs, kind, x, t, labels, mode, args.compile_backend)
            result = race(variants, timer, args)
            flops = {"ours": step_flops(variants[f"ours {modes[0]}"]),
                     "diffusers": step_flops(variants[f"diffusers {modes[0]}"])}
            for mode in modes:
                o, d = result[f"ours {mode}"], result[f"diffusers {mode}"]
                rows.append({
                    "model": f"{label} {name}", "mode": mode, "grid": f"{s}x{s}", "batch": args.batch,
                    "params_m": [params_m(ours), params_m(theirs)],
                    "ours_samples_per_s": args.batch / o["seconds"],
                    "diffusers_samples_per_s": args.batch / d["seconds"],
                    "ratio": d["seconds"] / o["seconds"],
                    "peak_gib": [o["peak_gib"], d["peak_gib"]],
                    "recompiled_after_warmup": o["recompiled_after_warmup"],
                    "ours_tflops": flops["ours"] / o["seconds"] / 1e12,
                    "diffusers_tflops": flops["diffusers"] / d["seconds"] / 1e12,
                    "step_gflop": flops["ours"] / 1e9,
                })
            del ours, theirs, variants
            if device.type == "cuda":
                torch.cuda.empty_cache()
            report["training"] = rows
            report.flush()
    peak = report["peak_tflops"]
    print("\n1. training step (forward + backward), samples/s; ratio = ours / diffusers")
    print(f"{'model':<16}{'mode':>14}{'batch':>7}{'params M':>14}{'ours':>10}{'diffusers':>11}{'ratio':>7}"
          f"{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>14}{'recomp.':>8}")
    for r in rows:
        mfu = f"{100 * r['ours_tflops'] / peak:.0f}%" if peak and r["mode"] != "fp32" else "-"
        mem = "/".join(f"{v:.1f}" for v in r["peak_gib"]) if r["peak_gib"][0] is not None else "-"
        print(f"{r['model']:<16}{r['mode']:>14}{r['batch']:>7}{'/'.join(f'{p:.1f}' for p in r['params_m']):>14}"
              f"{r['ours_samples_per_s']:>10.1f}{r['diffusers_samples_per_s']:>11.1f}{r['ratio']:>7.2f}"
              f"{r['ours_tflops']:>9.1f}{mfu:>7}{mem:>14}{r['recompiled_after_warmup']:>8}")


def sampling_section(args, device, timer, report) -> None:
    from hydra.utils import instantiate

    from scidiff.conditioning import Conditioning
    from scidiff.diffusion import GaussianDiffusion
    from scidiff.diffusion.schedules import NoiseSchedule
    from scidiff.inference.generation import DDIM, DPMSolver, sample_model
    from scidiff.nets.execution import Accelerated, Execution

    diffusion = GaussianDiffusion(NoiseSchedule.from_name("cosine", 1000), prediction="v")
    cases = [("quickstart UNet", "unet_tiny_conv", 1, args.quickstart_grid, 2, args.quickstart_batch,
              [("DDIM-20", DDIM(steps=20))]),
             (f"UNet {args.sampling_preset}", args.sampling_preset, args.channels, args.grid, 0, args.sampling_batch,
              [("DDIM-50", DDIM(steps=50)), ("DPM-Solver++ 2M, 20 calls", DPMSolver(steps=20))])]
    rows = []
    for label, name, c, s, p, batch, samplers in cases:
        cfg = denoiser_config(name, channels=c, dims=2, num_params=p)
        torch.manual_seed(0)
        net = instantiate(cfg).to(device).eval().requires_grad_(False)
        fast = Accelerated(net, Execution(precision="bf16", compile=True, backend=args.compile_backend), 2)
        x_T = torch.randn(batch, c, s, s, device=device)
        cond = Conditioning(params=torch.randn(batch, p, device=device)) if p else None
        for sampler_name, sampler in samplers:
            rates = {}
            for mode, den in (("fp32", net), ("bf16+compile", fast)):
                half = max(2, batch // 2)
                with torch.no_grad():
                    sample_model(den, diffusion, x_T, cond, sampler=sampler)  # warm-up: compilation, kernel choice
                    before = graphs_compiled()
                    sample_model(den, diffusion, x_T[:half], None if cond is None else
                                 Conditioning(params=cond.params[:half]), sampler=sampler)  # another batch size
                    timer.sync()
                    timer.reset_peak()
                    tic = time.perf_counter()
                    for _ in range(args.sampling_rounds):
                        sample_model(den, diffusion, x_T, cond, sampler=sampler)
                    timer.sync()
                    seconds = (time.perf_counter() - tic) / args.sampling_rounds
                rates[mode] = {"members_per_s": batch / seconds, "peak_gib": timer.peak_gib(),
                               "recompiled_after_warmup": graphs_compiled() - before}
            rows.append({"model": f"{label} ({name})", "grid": f"{s}x{s}", "sampler": sampler_name, "batch": batch,
                         **{f"{m} {k}": v for m, r in rates.items() for k, v in r.items()},
                         "vs_cpu": (rates["bf16+compile"]["members_per_s"] / args.cpu_rate
                                    if label == "quickstart UNet" else None)})
        report["sampling"] = rows
        report.flush()
    print(f"\n3. sampling, members/s of batched generation (random weights); CPU figure {args.cpu_rate} members/s")
    print(f"{'model':<34}{'sampler':>28}{'batch':>7}{'fp32':>10}{'bf16+comp.':>12}{'x CPU':>8}{'recomp.':>8}")
    for r in rows:
        vs = f"{r['vs_cpu']:.0f}x" if r["vs_cpu"] else "-"
        print(f"{r['model']:<34}{r['sampler']:>28}{r['batch']:>7}{r['fp32 members_per_s']:>10.1f}"
              f"{r['bf16+compile members_per_s']:>12.1f}{vs:>8}{r['bf16+compile recompiled_after_warmup']:>8}")


def voxels_section(args, device, timer, report) -> None:
    from hydra.utils import instantiate

    rows = []
    v = args.voxels
    for checkpoint in (False, True):
        cfg = denoiser_config(PRESETS[args.sizes[0]][0], channels=1, dims=3)
        cfg["checkpoint"] = checkpoint
        torch.manual_seed(0)
        net = instantiate(cfg).to(device).train()
        x = torch.randn(args.voxel_batch, 1, v, v, v, device=device)
        t = torch.randint(0, 1000, (args.voxel_batch,), device=device)
        res = race({"bf16": training_step(net, "ours", x, t, None, "bf16", args.compile_backend)}, timer, args)["bf16"]
        rows.append({"model": f"UNet-3D {PRESETS[args.sizes[0]][0]}", "grid": f"{v}^3", "batch": args.voxel_batch,
                     "activation_checkpointing": checkpoint, "samples_per_s": args.voxel_batch / res["seconds"],
                     "peak_gib": res["peak_gib"]})
        del net
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["voxels"] = rows
    report.flush()
    print("\n4. 3-D UNet training step, bf16")
    for r in rows:
        mem = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "-"
        print(f"{r['model']:<24}{r['grid']:>8} batch {r['batch']:<4} checkpointing {str(r['activation_checkpointing']):<6}"
              f"{r['samples_per_s']:>10.2f} samples/s   peak {mem}")


def attention_section(args, device, report) -> None:
    from hydra.utils import instantiate
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "memory-efficient": SDPBackend.EFFICIENT_ATTENTION}
    rows = []
    for name in PRESETS[args.sizes[-1]]:
        net = instantiate(denoiser_config(name, channels=args.channels, dims=2)).to(device).eval()
        x = torch.randn(2, args.channels, args.grid, args.grid, device=device)
        t = torch.randint(0, 1000, (2,), device=device)
        row = {"model": name}
        for label, kernel in kernels.items():
            try:
                with torch.no_grad(), autocast(device, "bf16"), sdpa_kernel([kernel]):
                    net(x, t, None)
                row[label] = "used"
            except RuntimeError as exc:
                row[label] = f"refused: {str(exc).splitlines()[0][:80]}"
        rows.append(row)
    report["attention"] = rows
    report.flush()
    print("\n5. SDPA kernels accepting every attention call (bf16)")
    for r in rows:
        print(f"{r['model']:<10} flash: {r['flash']:<40} memory-efficient: {r['memory-efficient']}")


class Report(dict):
    """The results so far; :meth:`flush` rewrites the JSON file."""

    def __init__(self, path: Path | None, **meta) -> None:
        super().__init__(**meta)
        self.path = path

    def flush(self) -> None:
        if self.path is not None:
            self.path.write_text(json.dumps(self, indent=2, default=str))


def write_gpu_page(path: Path, report: Report, argv: list[str]) -> None:
    from page import command, hardware, markdown_table, software, write_page

    peak = report["peak_tflops"]
    parts = []
    if report.get("training"):
        parts.append("### Training step (forward + backward)\n\n" + markdown_table(
            ["model", "mode", "batch x grid", "params (M) ours / diffusers", "scidiff samples/s",
             "diffusers samples/s", "ratio", "TFLOP/s (MFU)", "peak GiB ours / diffusers", "recompilations"],
            [[r["model"], r["mode"], f"{r['batch']} x {r['grid']}", " / ".join(f"{p:.1f}" for p in r["params_m"]),
              f"{r['ours_samples_per_s']:.1f}", f"{r['diffusers_samples_per_s']:.1f}", f"**{r['ratio']:.2f}**",
              f"{r['ours_tflops']:.1f}" + (f" ({100 * r['ours_tflops'] / peak:.0f} %)" if peak else ""),
              " / ".join("-" if v is None else f"{v:.1f}" for v in r["peak_gib"]), r["recompiled_after_warmup"]]
             for r in report["training"]]))
    if report.get("sampling"):
        parts.append("### Sampling (batched members/s)\n\n" + markdown_table(
            ["model", "grid", "sampler", "batch", "fp32", "bf16 + compile", "x the CPU figure", "recompilations"],
            [[r["model"], r["grid"], r["sampler"], r["batch"], f"{r['fp32 members_per_s']:.1f}",
              f"{r['bf16+compile members_per_s']:.1f}", "-" if r["vs_cpu"] is None else f"{r['vs_cpu']:.0f}x",
              r["bf16+compile recompiled_after_warmup"]] for r in report["sampling"]]))
    if report.get("voxels"):
        parts.append("### 3-D UNet\n\n" + markdown_table(
            ["model", "grid", "batch", "activation checkpointing", "samples/s", "peak GiB"],
            [[r["model"], r["grid"], r["batch"], r["activation_checkpointing"], f"{r['samples_per_s']:.2f}",
              "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"] for r in report["voxels"]]))
    if report.get("attention"):
        parts.append("### Attention kernels (bf16)\n\n" + markdown_table(
            ["denoiser", "flash", "memory-efficient"],
            [[r["model"], r["flash"], r["memory-efficient"]] for r in report["attention"]]))
    extra = {"diffusers": sys.modules["diffusers"].__version__} if "diffusers" in sys.modules else {}
    summary = ("The fast paths on one device: training steps of scidiff's UNet and DiT against diffusers' "
               "equal models in fp32, bf16 autocast and bf16 + `torch.compile` (rounds alternating in one "
               "process, best round), the model FLOP utilisation against the dense bf16 peak "
               f"({peak} TFLOP/s), batched sampling, a 3-D UNet at 64³ and the attention kernels.")
    write_page(path, "GPU fast paths", summary, command(__file__, argv), "\n\n".join(parts),
               hardware_line=hardware(report["device"]), software_line=software(extra))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="s,b", help="denoiser presets, comma-separated: tiny, s, b")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated: {', '.join(MODES)}")
    parser.add_argument("--compile-sizes", default=None,
                        help="the sizes measured with bf16+compile (default: the last of --sizes; compiling takes a "
                             "minute per model)")
    parser.add_argument("--sections", default="training,sampling,voxels,attention")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--grid", type=int, default=64, help="2-D grid side")
    parser.add_argument("--batch", type=int, default=64, help="training batch at 2-D")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sampling-batch", type=int, default=256)
    parser.add_argument("--sampling-rounds", type=int, default=2)
    parser.add_argument("--sampling-preset", default="unet", help="the 64x64 sampling case's denoiser preset")
    parser.add_argument("--quickstart-grid", type=int, default=16)
    parser.add_argument("--quickstart-batch", type=int, default=2048)
    parser.add_argument("--cpu-rate", type=float, default=76.8,
                        help="the quickstart UNet's CPU members/s at DDIM-20 "
                             "(docs/benchmarks/sampling-throughput.md, AMD EPYC, 2026-12-02)")
    parser.add_argument("--voxels", type=int, default=64, help="3-D grid side")
    parser.add_argument("--voxel-batch", type=int, default=4)
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: a smoke run)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, TFLOP/s")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--page", type=Path, default=None)
    args = parser.parse_args(argv)
    args.sizes = [s for s in args.sizes.split(",") if s]
    args.modes = [m for m in args.modes.split(",") if m]
    args.compile_sizes = args.compile_sizes.split(",") if args.compile_sizes else args.sizes[-1:]
    if bad := [s for s in args.sizes if s not in PRESETS] + [m for m in args.modes if m not in MODES]:
        parser.error(f"unknown size or mode: {bad}")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    report = Report(args.json, device=str(device), torch=torch.__version__,
                    device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    peak_tflops=peak_tflops(device, args.peak_tflops))
    print(f"GPU fast paths on {report['device_name']} (dense bf16 peak {report['peak_tflops']} TFLOP/s), "
          f"torch {torch.__version__}", flush=True)
    timer = Timer(device)
    sections = set(args.sections.split(","))
    if "training" in sections:
        training_section(args, device, timer, report)
    if "sampling" in sections:
        sampling_section(args, device, timer, report)
    if "voxels" in sections:
        voxels_section(args, device, timer, report)
    if "attention" in sections:
        attention_section(args, device, report)
    report.flush()
    if args.page:
        write_gpu_page(args.page, report, sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
