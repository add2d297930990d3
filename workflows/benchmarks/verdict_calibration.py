"""The verdict's rates on Gaussian random fields, where the right answer is known.

The verdict (``scidiff/evaluation/verdict.py``) judges each sample metric of a model
against its noise floor. Its tolerances trade two errors: judging a perfect model not
faithful (noise alone), and judging a broken one faithful. This script measures both on
stores of periodic Gaussian random fields (16 x 16, P(k) = A k^-n, n uniform in [1, 3.5],
A log-uniform in [0.5, 2]), for a model conditional on (n, A) and an unconditional one,
at several designs ``B x M`` (``B`` evaluated samples, the test quarter of a store of
``4 B`` fields, ``M`` members each), ``--stores`` independent stores per design:

* **null models**, which draw from the data's own distribution: a *second floor* (the
  next ``M`` nearest real fields after the floor's own ``M``; for the unconditional model
  other random fields) and *exact draws* from each sample's true distribution (its own
  (n, A); fresh (n, A) for the unconditional model). The rate judged faithful should be
  near 1;
* **broken models**: the exact draws with the spread of their domain mean cut to a
  quarter (every ``k != 0`` exact: what a denoiser blind to the field mean makes), the
  exact draws scaled by 1.3 (30 % too wide), and the exact draws with each member scaled by
  its own ``exp(0.05 z)`` (all of a member's scales moving together by ~5 %, as a network
  normalising each sample by its own statistics makes them: the shell correlation's case).
  The rate judged faithful should be 0.

The ensembles go through ``scidiff.evaluation.evaluate`` as ensemble stores (no model is
called), so every number is the product's own. Run:

    python workflows/benchmarks/verdict_calibration.py --page docs/benchmarks/verdict-calibration.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scidiff.data import FieldDataModule, FractionSplit  # noqa: E402
from scidiff.diffusion import GaussianDiffusion, NoiseSchedule  # noqa: E402
from scidiff.evaluation import BoundSettings, EvaluationSettings, SamplingSettings, evaluate  # noqa: E402
from scidiff.evaluation.data import build_datamodule  # noqa: E402
from scidiff.evaluation.floor import FloorEnsemble, FloorSettings  # noqa: E402
from scidiff.evaluation.verdict import VerdictSettings  # noqa: E402
from scidiff.inference import DDIM, Pretrained  # noqa: E402
from scidiff_datasets import grf  # noqa: E402

SHAPE = (16, 16)
MODELS = {"second floor": "null", "exact draws": "null", "domain mean / 4": "broken", "scaled x 1.3": "broken",
          "member scales x exp(0.05 z)": "broken"}


class NoModel(nn.Module):
    """A placeholder denoiser: the ensembles come from stores, the model is never called."""

    def forward(self, x, t, cond=None):
        raise RuntimeError("the calibration evaluates ensemble stores; no model is called")


def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(spectral index, amplitude) of ``n`` fields."""
    return rng.uniform(1.0, 3.5, n), np.exp(rng.uniform(math.log(0.5), math.log(2.0), n))


def write_store(path: Path, rng: np.random.Generator, n: int) -> xr.Dataset:
    index, amplitude = draw(rng, n)
    fields = grf.sample_fields(rng.standard_normal((n, *SHAPE)), amplitude, index)
    ds = xr.Dataset({"field": (("sample", "y", "x"), fields.astype(np.float32), {"units": "1"}),
                     "spectral_index": ("sample", index.astype(np.float32)),
                     "amplitude": ("sample", amplitude.astype(np.float32))}, coords={"sample": np.arange(n)})
    ds.to_zarr(path)
    return ds


def pretrained_of(path: Path, conditional: bool) -> Pretrained:
    """The store's metadata and statistics as a :class:`Pretrained` (test quarter held out)."""
    cfg = {"_target_": "scidiff.data.FieldDataModule", "_convert_": "all", "path": str(path),
           "variables": [{"name": "field", "transform": "zscore"}], "spatial_dims": ["y", "x"],
           "sample_dims": "sample", "batch_size": 32, "mask": "never", "num_workers": 0,
           "split": {"_target_": "scidiff.data.FractionSplit", "train": 0.5, "val": 0.25, "test": 0.25}}
    if conditional:
        cfg["params"] = [{"name": "spectral_index", "transform": "zscore"}, {"name": "amplitude", "transform": "log"}]
    dm = FieldDataModule(**{k: v for k, v in cfg.items() if not k.startswith("_") and k != "split"},
                         split=FractionSplit(0.5, 0.25, 0.25))
    dm.setup()
    diffusion = GaussianDiffusion(NoiseSchedule.from_name("linear", num_timesteps=40))
    return Pretrained(denoiser=NoModel(), diffusion=diffusion, metadata=dm.metadata, statistics=dm.statistics,
                      config={"data": cfg},
                      checkpoint=path.parent / "none.ckpt", sha256="0" * 64, global_step=0, weights="raw",
                      split_indices={k: v.tolist() for k, v in dm.split_indices.items()})


def ensembles(pretrained: Pretrained, data: xr.Dataset, members: int, conditional: bool,
              rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The test indices and each model's members ``[B, M, *S]``."""
    dm = build_datamodule(pretrained)
    test = np.asarray(dm.split_indices["test"])
    twice = FloorEnsemble(dm, dm.datasets["test"], pretrained.metadata, test, 2 * members, FloorSettings(), seed=0)
    field = data["field"].values.astype(np.float64)
    b = test.size
    if conditional:
        index = np.repeat(data["spectral_index"].values[test], members)
        amplitude = np.repeat(data["amplitude"].values[test], members)
    else:
        index, amplitude = draw(rng, b * members)
    exact = grf.sample_fields(rng.standard_normal((b * members, *SHAPE)), amplitude, index).reshape(
        b, members, *SHAPE)
    blind = exact - 0.75 * exact.mean(axis=(-2, -1), keepdims=True)
    coupled = exact * np.exp(0.05 * rng.standard_normal((b, members, 1, 1)))
    return test, {"second floor": field[twice.indices[:, members:]], "exact draws": exact,
                  "domain mean / 4": blind, "scaled x 1.3": 1.3 * exact, "member scales x exp(0.05 z)": coupled}


def run_design(samples: int, members: int, conditional: bool, stores: int, seed: int, root: Path) -> dict:
    """Every model's verdicts over ``stores`` independent stores of one design."""
    out = {name: {"faithful": 0, "runs": 0, "failing": {}, "domain_mean_log_ratio": [], "shell_excess": []}
           for name in MODELS}
    settings = EvaluationSettings(split="test", batch_size=64, bound=BoundSettings(enabled=False),
                                  sampling=SamplingSettings(members=members), sampler=DDIM(steps=2))
    for s in range(stores):
        rng = np.random.default_rng([seed, samples, members, int(conditional), s])
        where = root / f"{'c' if conditional else 'u'}{samples}x{members}_{s}"
        where.mkdir(parents=True)
        data = write_store(where / "grf.zarr", rng, 4 * samples)
        pretrained = pretrained_of(where / "grf.zarr", conditional)
        test, models = ensembles(pretrained, data, members, conditional, rng)
        for name, values in models.items():
            path = where / f"{name.replace(' ', '_').replace('/', '')}.zarr"
            xr.Dataset({"field": (("sample", "member", "y", "x"), values.astype(np.float32))},
                       coords={"data_index": ("sample", test.astype(np.int64))}).to_zarr(path)
            ev = evaluate(pretrained, settings, ensemble=path, device="cpu", progress=False)
            row = out[name]
            row["runs"] += 1
            row["faithful"] += int(ev.verdict.faithful)
            for key in ev.verdict.failing:
                metric = key.split("/")[0]
                row["failing"][metric] = row["failing"].get(metric, 0) + 1
            sc = ev.scalars
            row["domain_mean_log_ratio"].append(
                math.log(sc["domain_mean_std_ratio/field"] / sc["floor/domain_mean_std_ratio/field"]))
            # the shell correlation's excess over the floor, in standard errors of the difference
            se = math.hypot(sc["shell_correlation_se/field"], sc["floor/shell_correlation_se/field"])
            row["shell_excess"].append((sc["shell_correlation/field"] - sc["floor/shell_correlation/field"]) / se)
    return out


def format_tables(results: list[dict]) -> str:
    from page import markdown_table

    rows = []
    for r in results:
        for name, kind in MODELS.items():
            m = r["models"][name]
            logs = np.abs(m["domain_mean_log_ratio"])
            failing = ", ".join(f"{k} {v}" for k, v in sorted(m["failing"].items(), key=lambda kv: -kv[1])) or "-"
            excess = np.asarray(m["shell_excess"])
            rows.append([r["conditioning"], f"{r['samples']} x {r['members']}", f"{name} ({kind})",
                         f"{m['faithful']}/{m['runs']}", f"{np.median(logs):.3f}", f"{logs.max():.3f}",
                         f"{np.median(excess):+.1f}", f"{excess.max():+.1f}", failing])
    return markdown_table(["model", "samples x members", "ensembles", "judged faithful",
                           "median abs ln(domain-mean ratio / floor's)", "max",
                           "median shell-correlation excess (se)", "max", "failing metrics (runs)"], rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stores", type=int, default=10, help="independent stores per design")
    p.add_argument("--designs", nargs="+", default=["16x3", "32x4", "32x8", "64x8", "128x4"],
                   help="evaluated samples x members")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--page", type=Path, help="write the benchmark page here")
    args = p.parse_args(argv)
    designs = [tuple(int(v) for v in d.lower().split("x")) for d in args.designs]
    results = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for conditional in (True, False):
            for samples, members in designs:
                models = run_design(samples, members, conditional, args.stores, args.seed, Path(tmp))
                results.append({"conditioning": "conditional (n, A)" if conditional else "unconditional",
                                "samples": samples, "members": members, "models": models})
                print(f"{results[-1]['conditioning']} {samples}x{members}: "
                      + "; ".join(f"{n} {m['faithful']}/{m['runs']}" for n, m in models.items()), flush=True)
    print(f"{time.perf_counter() - start:.0f} s")
    tables = format_tables(results)
    print(tables)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.page:
        from page import command, hardware, software, write_page

        summary = (
            "How often the verdict judges a model faithful, on stores of periodic Gaussian random fields "
            "(16 x 16, P(k) = A k^-n, n in [1, 3.5], A in [0.5, 2]) where the right answer is known: null "
            "ensembles (a second floor of real fields; exact draws from each sample's distribution) should "
            "pass, broken ones (the domain mean's spread cut to a quarter with every k != 0 exact; members "
            "scaled by 1.3; each member scaled by its own exp(0.05 z), so that its scales co-vary) should fail. "
            "The shell-correlation excess is (model - floor) in standard errors of the difference; the verdict "
            f"allows {VerdictSettings().correlation_factor:g}. {args.stores} independent stores per design; the "
            "test quarter of a store of 4 x samples fields is evaluated. The ensembles go through "
            "`scidiff.evaluation.evaluate` "
            "as ensemble stores, so the numbers are the product's own."
        )
        write_page(args.page, "Verdict calibration: null and broken ensembles", summary,
                   command(__file__, sys.argv[1:] if argv is None else argv), tables,
                   hardware_line=hardware(), software_line=software())


if __name__ == "__main__":
    main()
