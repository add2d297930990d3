"""Benchmark pages: ``workflows/benchmarks/page.py`` and the ``--page`` option of every
measuring script.

* ``page.py`` writes the documented layout (title, summary, date, hardware, software, the
  exact command, the result, the marker) and keeps the hand-written part below the marker
  when a page is regenerated;
* every page in ``docs/benchmarks/`` has that layout, so any of them can be regenerated;
* the three benchmark scripts write their page on their cheapest settings (in a
  subprocess, as a user runs them), and the three workflows whose runs take hours
  (``quickstart_quality.py``, ``grf_likelihood.py``, ``grf_conditional.py``) write theirs
  from reports of the shape their runs produce.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.forked import run_forked

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "docs" / "benchmarks"


def load_workflow(path: Path):
    """Import a workflow script as a module (registered first: its dataclasses need it)."""
    name = f"_docs_test_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def page():
    return load_workflow(ROOT / "workflows" / "benchmarks" / "page.py")


def check_layout(text: str, marker: str, where: str) -> None:
    lines = text.splitlines()
    assert lines[0].startswith("# "), f"{where}: the first line must be the title"
    for field in ("Date", "Hardware", "Software", "Command"):
        assert re.search(rf"^- \*\*{field}:\*\* \S", text, re.M), f"{where}: no '- **{field}:**' line"
    assert re.search(r"^- \*\*Date:\*\* \d{4}-\d{2}-\d{2}$", text, re.M), f"{where}: the date is not ISO"
    assert re.search(r"^- \*\*Command:\*\* `[^`]+`$", text, re.M), f"{where}: the command is not one code span"
    assert "\n## Result\n" in text, f"{where}: no '## Result' section"
    assert text.count(marker) == 1, f"{where}: the marker line must appear once"
    assert text.index("## Result") < text.index(marker), f"{where}: the result must come before the marker"
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)     # a '# ' in a code block is a comment
    assert sum(1 for line in prose.splitlines() if line.startswith("# ")) == 1, f"{where}: one title only"


# ----------------------------------------------------------------------------- page.py
def test_write_page_layout_and_kept_notes(page, tmp_path):
    path = tmp_path / "sub" / "bench.md"
    table = page.markdown_table(["a", "b|c"], [[1, "x|y"], [2.5, "`p|q` r|s"]])
    assert table.splitlines()[0] == "| a | b\\|c |"
    assert table.splitlines()[2] == "| 1 | x\\|y |"
    assert table.splitlines()[3] == "| 2.5 | `p|q` r\\|s |"     # no escape inside a code span
    with pytest.raises(ValueError, match="cells"):
        page.markdown_table(["a", "b"], [[1]])

    page.write_page(path, "My bench", "What it measures.", "python workflows/x.py --n 1", table,
                    notes="## Discussion\n\nHand-written.")
    text = path.read_text()
    check_layout(text, page.MARKER, "new page")
    assert f"- **Date:** {datetime.date.today().isoformat()}" in text
    assert "- **Command:** `python workflows/x.py --n 1`" in text
    assert text.endswith("Hand-written.\n")

    # regenerated: new result, the discussion below the marker is kept, notes= ignored
    page.write_page(path, "My bench", "What it measures.", "python workflows/x.py --n 2", "| new |",
                    date="2030-01-02", notes="ignored")
    again = path.read_text()
    check_layout(again, page.MARKER, "regenerated page")
    assert "| new |" in again and "x|y" not in again and "ignored" not in again
    assert again.split(page.MARKER, 1)[1] == text.split(page.MARKER, 1)[1]
    assert "- **Date:** 2030-01-02" in again

    # writing the same page twice gives the same bytes
    page.write_page(path, "My bench", "What it measures.", "python workflows/x.py --n 2", "| new |",
                    date="2030-01-02")
    assert path.read_text() == again
    assert not list(path.parent.glob(".*tmp*"))


def test_command_and_machine_lines(page):
    script = ROOT / "workflows" / "benchmarks" / "loader_throughput.py"
    assert page.command(script, ["--chunk", "1", "--store", "a b.zarr"]) == (
        "python workflows/benchmarks/loader_throughput.py --chunk 1 --store 'a b.zarr'")
    assert f"{os.cpu_count()} CPUs visible" in page.hardware()
    assert "torch " in page.software({"zarr": "3.1"}) and page.software({"zarr": "3.1"}).endswith("zarr 3.1")
    with pytest.raises(ValueError, match="backtick"):
        page.render_page("t", "s", "echo `x`", "r")


def test_every_benchmark_page_has_the_layout(page):
    pages = sorted(p for p in BENCHMARKS.glob("*.md") if p.name != "index.md")
    assert len(pages) >= 8
    index = (BENCHMARKS / "index.md").read_text()
    for p in pages:
        check_layout(p.read_text(encoding="utf-8"), page.MARKER, str(p.relative_to(ROOT)))
        assert f"({p.name})" in index, f"docs/benchmarks/index.md does not link {p.name}"


# ------------------------------------------------------------------ scripts, cheapest settings
def run_script(args: list[str], tmp_path: Path, extra_env: dict[str, str] | None = None) -> str:
    """``python <script> <args>`` in ``tmp_path``, a process forked from the tests' zygote
    (``tests/forked.py``): stdout and stderr, after checking it succeeded."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(extra_env or {})}
    proc = run_forked(Path(args[0]), args[1:], tmp_path, env, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return out


def test_loader_throughput_page(page, tmp_path):
    dest = tmp_path / "loader.md"
    run_script([str(ROOT / "workflows/benchmarks/loader_throughput.py"), "--num-samples", "32", "--shape", "8", "8",
                "--workers", "0", "--batch-size", "8", "--page", str(dest)], tmp_path)
    text = dest.read_text()
    check_layout(text, page.MARKER, "loader page")
    assert "| naive xarray loop | - |" in text and "| FieldDataModule | 0 |" in text
    assert "--num-samples 32" in text and "zarr " in text


def test_denoiser_throughput_page(page, tmp_path):
    dest = tmp_path / "denoiser.md"
    run_script([str(ROOT / "workflows/benchmarks/denoiser_throughput.py"), "--device", "cpu", "--only", "unet3d",
                "--size", "tiny", "--channels", "1", "--size3d", "8", "--batch3d", "1", "--warmup", "0",
                "--steps", "1", "--rounds", "1", "--threads", "1", "--page", str(dest)], tmp_path)
    text = dest.read_text()
    check_layout(text, page.MARKER, "denoiser page")
    assert "| UNet-3D unet_tiny | 8x8x8 | 1 |" in text


def test_lightning_overhead_page(page, tmp_path):
    dest = tmp_path / "lightning.md"
    run_script([str(ROOT / "workflows/benchmarks/lightning_overhead.py"), "--steps", "3", "--warmup", "1",
                "--rounds", "1", "--size", "8", "--batch", "2", "--threads", "1", "--page", str(dest)], tmp_path)
    text = dest.read_text()
    check_layout(text, page.MARKER, "lightning page")
    assert "| unet_tiny | 2 x 8x8 | cpu | 1 |" in text and "lightning " in text


def test_latent_speed_page(page, tmp_path):
    """The experiments' field and latent denoisers and our autoencoder next to diffusers' (skipped
    without diffusers, the bench extra)."""
    pytest.importorskip("diffusers")
    dest = tmp_path / "latent.md"
    run_script([str(ROOT / "workflows/benchmarks/latent_speed.py"), "--cases", "grf", "--steps", "1", "--members",
                "1", "--batch", "1", "--rounds", "1", "--page", str(dest)], tmp_path)
    text = dest.read_text()
    check_layout(text, page.MARKER, "latent speed page")
    assert "| grf 1x64x64 -> latent 4x16x16 |" in text and "| diffusers AutoencoderKL 64x64 |" in text


# ----------------------------------------------------------- workflows, from their reports
def test_quickstart_quality_page(page, tmp_path):
    qq = load_workflow(ROOT / "workflows" / "quickstart_quality.py")
    scalars = {**{f"{m}/field": 0.5 for m in qq.METRICS}, **{f"floor/{m}/field": 0.4 for m in qq.METRICS}}
    doc = {
        "run": "/x/outputs/quickstart/qs", "samples": 64, "members": 8, "likelihood_samples": 16,
        "sample_metrics": {name: {"scalars": scalars, "verdict": "faithful", "seconds": 12.0} for name in qq.SAMPLERS},
        "slopes": {name: {"requested": list(qq.HELD_OUT), "measured": [2.0, 2.3, 2.4], "reference": [2.1, 2.2, 2.5]}
                   for name in qq.SAMPLERS},
        "likelihood": {"true_nll_bpd": 0.84, "bpd": 1.69, "bpd/fixed_large": 1.1, "bpd/optimal": 1.09,
                       "ode_bpd": 0.87, "gap_se/fixed_small": 0.036, "gap_se/ode": 0.014},
    }
    md = qq.tables(doc)
    dest = tmp_path / "qq.md"
    qq.write_benchmark_page(dest, doc, md, ["outputs/quickstart/qs", "--page", str(dest)], 32)
    text = dest.read_text()
    check_layout(text, page.MARKER, "quickstart quality page")
    assert "`python workflows/quickstart_quality.py outputs/quickstart/qs --page" in text
    assert "| ddpm | 0.500 / 0.400 |" in text and "### Likelihood of 16 held-out fields" in text


def test_grf_likelihood_page(page, tmp_path):
    gl = load_workflow(ROOT / "workflows" / "grf_likelihood.py")
    exact = {"num_samples": 32, "true_nll_bpd": 0.889, "true_nll_bpd_se": 0.104, "bpd": 8.433, "bpd_se": 0.963,
             "gap/fixed_small": 7.544, "gap_se/fixed_small": 0.951, "bpd/optimal": 3.291, "bpd_se/optimal": 0.106,
             "gap/optimal": 2.403, "gap_se/optimal": 0.027}
    model = {
        "variance": "fixed_small", "variants": ["fixed_small", "optimal"], "exact": exact,
        "importance": {**exact, "bpd_mc_se": 5.97, "bpd_mc_se/optimal": 2.22},
        "ode": {"num_samples": 8, "ode_bpd": 1.275, "ode_bpd_se": 0.202, "gap/ode": 0.345, "gap_se/ode": 0.022,
                "ode_bpd_probe_se": 0.01},
        "timing": {"bound_seconds_per_1000": 578.0, "num_samples": 8, "loadavg_1min_after": 2.2},
        "training_global_step": 500, "training_wall_time_s": 934.0,
        "exact_terms": {"L0_reconstruction_bpd": -5.04, "first_10_denoising_steps_bpd": 2.58,
                        "middle_steps_bpd": 4.60, "last_10_steps_bpd": 6.68, "last_step_bpd": 6.63,
                        "largest": [{"t": 999, "bpd": 6.63}]},
    }
    models = {"fixed": model}
    doc = {"shape": [16, 16], "num_samples": 1024, "steps": 500, "trained_concurrently": True, "num_terms": 64,
           "eval_samples": 32, "timing_samples": 8, "ode_steps": 100, "ode_probes": 4, "ode_samples": 32}
    dest = tmp_path / "gl.md"
    gl.write_benchmark_page(dest, doc, gl.markdown_table(models), gl.terms_lines(models), ["--page", str(dest)])
    text = dest.read_text()
    check_layout(text, page.MARKER, "grf likelihood page")
    assert "| fixed | fixed_small (the model's) | 8.433 ± 0.963 | 7.544 ± 0.951 |" in text
    assert "- fixed: exact per-timestep terms" in text and "t=999: 6.630" in text


def test_grf_conditional_page(page, tmp_path):
    gc = load_workflow(ROOT / "workflows" / "grf_conditional.py")
    requested = np.array([1.5, 2.25, 3.0])
    held = np.array([False, True, False])
    rng = np.random.default_rng(0)
    measured = requested[:, None] + 0.1 + 0.2 * rng.standard_normal((3, 4))
    reference = requested[:, None] + 0.2 * rng.standard_normal((3, 4))
    report = gc.SlopeReport(
        requested=requested.tolist(), held_out=held.tolist(), measured_members=measured.tolist(),
        measured_mean=measured.mean(1).tolist(), measured_std=measured.std(1, ddof=1).tolist(),
        reference_mean=reference.mean(1).tolist(), reference_std=reference.std(1, ddof=1).tolist(),
        k_range_cycles=(0.05, 0.35),
        metrics={**gc.slope_metrics(requested, measured, held),
                 **gc.slope_metrics(requested, reference, held, prefix="reference/")},
    )
    preset = gc.PRESETS["cpu"]
    doc = {"size": "cpu", "preset": {"num_samples": preset.num_samples, "shape": preset.shape, "members": 4},
           "held_out_band": gc.HELD_OUT_BAND, "guidance_scale": 1.0, "training_global_step": 4000,
           "training_wall_time_s": 592.0, "members_per_s": 13.0, "timings_s": {"total_s": 628.0}}
    dest = tmp_path / "gc.md"
    gc.write_benchmark_page(dest, doc, report, ["--size", "cpu", "--page", str(dest)])
    text = dest.read_text()
    check_layout(text, page.MARKER, "grf conditional page")
    assert "| held out (2.25) |" in text and "| in range (1.5, 3) |" in text
    assert "| 2.25 | yes |" in text and "4000 training steps in 592 s" in text


def test_gpu_benchmark_script_runs_every_section(page, tmp_path, monkeypatch):
    """workflows/benchmarks/gpu.py, prepared on CPU for the GPU run: every section at the smallest
    settings (torch.compile with the eager backend), its JSON and its page."""
    pytest.importorskip("diffusers")
    dest, data = tmp_path / "gpu.md", tmp_path / "gpu.json"
    out = run_script([str(ROOT / "workflows/benchmarks/gpu.py"), "--device", "cpu", "--sizes", "tiny",
                      "--modes", "fp32,bf16+compile", "--grid", "16", "--batch", "2", "--warmup", "1", "--steps", "1",
                      "--rounds", "1", "--sampling-batch", "2", "--sampling-rounds", "1", "--sampling-preset",
                      "unet_tiny", "--quickstart-batch", "4", "--voxels", "8", "--voxel-batch", "1",
                      "--compile-backend", "eager", "--json", str(data), "--page", str(dest)], tmp_path)
    report = json.loads(data.read_text())
    assert [r["mode"] for r in report["training"]] == ["fp32", "bf16+compile"] * 2
    assert all(r["recompiled_after_warmup"] == 0 for r in report["training"])
    assert all(r["bf16+compile recompiled_after_warmup"] == 0 for r in report["sampling"])
    assert [r["activation_checkpointing"] for r in report["voxels"]] == [False, True]
    assert {r["flash"] for r in report["attention"]} == {"used"}
    text = dest.read_text()
    check_layout(text, page.MARKER, "gpu page")
    assert "| UNet unet_tiny | bf16+compile | 2 x 16x16 |" in text and "| DiT dit_tiny | fp32 |" in text
    assert "1. training step" in out and "5. SDPA kernels" in out
    # the recompilation count it reports moves when dynamo compiles (the zeros above are not vacuous)
    monkeypatch.syspath_prepend(str(ROOT / "workflows/benchmarks"))
    import gpu
    import torch

    before = gpu.graphs_compiled()
    torch.compile(lambda x: x.sin() + 1, backend="eager")(torch.randn(3))
    assert gpu.graphs_compiled() == before + 1


def test_mixed_precision_page(page, tmp_path, data_dir):
    dest = tmp_path / "mixed.md"
    out = run_script([str(ROOT / "workflows/benchmarks/mixed_precision.py"), "--steps", "4", "--page", str(dest)],
                     tmp_path, {"SCIDIFF_DATA_DIR": str(data_dir)})
    text = dest.read_text()
    check_layout(text, page.MARKER, "mixed precision page")
    assert "| validation loss at the last step |" in text and "| mean training loss, steps 3-3 |" in text
    assert "bf16-mixed against float32" in out


def test_execution_speed_page(page, tmp_path, trained_run):
    """workflows/benchmarks/execution_speed.py on the shared tiny checkpoint (read only; its stores go to
    temporary directories): one row per execution and micro-batch, float32's members as the reference."""
    dest = tmp_path / "execution.md"
    run_script([str(ROOT / "workflows/benchmarks/execution_speed.py"), str(trained_run / "outputs/quickstart/tiny"),
                "--members", "2", "--micro-batches", "2", "--rounds", "1", "--executions", "float32", "bf16",
                "--page", str(dest)], tmp_path)
    text = dest.read_text()
    check_layout(text, page.MARKER, "execution page")
    assert "| float32 | 2 |" in text and "| 0.0e+00 |" in text and "| bf16 | 2 |" in text


def test_spatial_ranks_page(page, tmp_path, trained_run):
    """workflows/benchmarks/spatial_ranks.py end to end on the shared tiny checkpoint (read only): the
    main job's evaluation (bound against the exact NLL) and every sampler, at the cheapest settings."""
    dest, data = tmp_path / "ranks.md", tmp_path / "ranks.json"
    run_script([str(ROOT / "workflows/benchmarks/spatial_ranks.py"), str(trained_run / "outputs/quickstart/tiny"),
                "--samples", "2", "--members", "2", "--calls", "3", "--mean-members", "4", "--no-ddpm",
                "--json", str(data), "--page", str(dest)], tmp_path)
    (report,) = json.loads(data.read_text())
    assert report["rank"] == 2 and report["steps"] == 30 and report["step_seconds"] > 0
    assert report["main_job"]["bpd"] > 0 and report["main_job"]["true_nll_bpd"] > 0
    assert report["norm"] == "none" and report["domain_mean_spread"] > 0  # the quickstart UNet: no GroupNorm
    assert list(report["samplers"]) == ["DDIM (leading)", "DPM-Solver++ 2M (logsnr)", "DPM-Solver++ 3M (logsnr)",
                                        "SDE-DPM-Solver++ 2M (logsnr)", "UniPC 3 (logsnr)", "Heun (trailing)",
                                        "Heun (karras)"]
    text = dest.read_text()
    check_layout(text, page.MARKER, "spatial ranks page")
    assert "### The models" in text and "| 2-D | 16 x 16 (y, x) |" in text
    assert "verdict (UniPC (3) 20 steps (logsnr)) |" in text  # the main job's sampler
    assert "| Heun (karras) | 3 | 2-D |" in text


def test_verdict_calibration_page(page, tmp_path):
    """workflows/benchmarks/verdict_calibration.py at its cheapest (one store, one small design):
    every model evaluated for both conditionings; the model blind to the domain mean fails on
    the domain mean's spread, and the layout holds."""
    dest, data = tmp_path / "calibration.md", tmp_path / "calibration.json"
    run_script([str(ROOT / "workflows/benchmarks/verdict_calibration.py"), "--stores", "1", "--designs", "16x3",
                "--json", str(data), "--page", str(dest)], tmp_path)
    results = json.loads(data.read_text())
    assert [r["conditioning"] for r in results] == ["conditional (n, A)", "unconditional"]
    for r in results:
        assert (r["samples"], r["members"]) == (16, 3)
        assert all(m["runs"] == 1 for m in r["models"].values())
        assert r["models"]["domain mean / 4"]["failing"].get("domain_mean_std_ratio") == 1
    text = dest.read_text()
    check_layout(text, page.MARKER, "verdict calibration page")
    assert "| conditional (n, A) | 16 x 3 | domain mean / 4 (broken) | 0/1 |" in text
    # the shell correlation's excess over the floor, in standard errors, for every model
    assert "median shell-correlation excess (se)" in text and "member scales x exp(0.05 z) (broken)" in text
