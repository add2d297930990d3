"""Conditional fidelity of the quickstart model, and guidance scale against fidelity and quality.

A contrastive encoder of the quickstart's fields and parameters (``experiment=quickstart_contrastive``,
trained here when absent) is first scored on real held-out fields: how often a field retrieves its
own parameters (n, A) among ``K`` candidates of the held-out band, for several ``K``. Then the
quickstart model is evaluated on the held-out band with ``fidelity.encoder`` at several guidance
scales: 0 is the model's unconditional prediction (its null condition, trained with condition
dropout 0.1: the unconditional model), 1 the conditional one, above 1 guided. For each: the
members' fidelity (top-1/top-5 retrieval of their own condition, mean similarity) beside the real
fields', and the sample quality (spectral error, CRPS, std ratio against their floor, verdict).
DPM-Solver++ 2M at 20 calls. Every fidelity score comes with its standard error over the
conditions. The real held-out fields give one field per condition, a noisy floor; the generator's
exact draws (``--members`` fresh fields at each evaluated condition, what a perfect model
generates) give the precise one.

    bash workflows/quickstart.sh                                    # the quickstart model
    python workflows/fidelity_guidance.py outputs/quickstart/<run> --data-path data/generated/grf_quickstart.zarr \
        --page docs/benchmarks/conditional-fidelity.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
from scidiff.evaluation import BoundSettings, EvaluationSettings, SamplingSettings, evaluate  # noqa: E402
from scidiff.evaluation.fidelity import FidelitySettings  # noqa: E402
from scidiff.inference import DPMSolver, GuidanceSpec, load_pretrained  # noqa: E402
from scidiff.inference.checkpoint import load_contrastive  # noqa: E402
from scidiff.nets.contrastive import retrieval_accuracy  # noqa: E402


def train_encoder(args) -> Path:
    run = args.out / "outputs" / "quickstart_contrastive" / "clip"
    if not (run / "summary.json").exists():
        subprocess.run([sys.executable, "-m", "scidiff.cli.train", "experiment=quickstart_contrastive", "run_name=clip",
                        f"data.path={args.data_path}", f"trainer.max_steps={args.encoder_steps}",
                        "trainer.enable_progress_bar=false"], cwd=args.out, check=True)
    return run


def datamodule(model, args):
    """The model's data module on ``args.data_path``, with its training statistics and splits."""
    import hydra.utils as hu

    dm = hu.instantiate(dict(model.config["data"]), path=str(args.data_path), num_workers=0, statistics_path=None)
    dm.load_state_dict({"statistics": model.statistics.state_dict(), "split_indices": model.split_indices})
    return dm


def encoder_retrieval(encoder, model, args) -> list[list[str]]:
    """Top-1 / top-5 retrieval of real held-out fields' own parameters among K candidates."""

    dm = datamodule(model, args)
    val = dm.datasets["val"]
    idx = np.asarray(val.indices)
    batch = val.read_batch(idx)
    x = model.to_physical(batch["x"].double())
    params = dm.inverse_params(batch["params"])
    z_field, z_cond = encoder.embed_fields(x), encoder.embed_conditions(params, None)
    rows = []
    rng = np.random.default_rng(0)
    for k in args.candidates:
        k = min(k, len(idx))
        accs = []
        for _ in range(20 if k < len(idx) else 1):  # random candidate sets of K held-out fields
            pick = torch.from_numpy(rng.choice(len(idx), size=k, replace=False))
            accs.append(retrieval_accuracy(z_field[pick], z_cond[pick], torch.arange(k)))
        top1, top5 = (float(np.mean([a[j] for a in accs])) for j in (1, 5))
        print(f"encoder retrieval among {k} held-out fields: top-1 {top1:.3f} (chance {1 / k:.3f}), "
              f"top-5 {top5:.3f} (chance {min(1.0, 5 / k):.3f})", flush=True)
        rows.append([str(k), f"{top1:.3f}", f"{1 / k:.3f}", f"{top5:.3f}", f"{min(1.0, 5 / k):.3f}"])
    return rows


def exact_draws(encoder, model, args) -> dict[str, float]:
    """The fidelity scores of a perfect model: ``args.members`` fresh draws of the GRF generator at
    each of the evaluated conditions (the first ``args.samples`` of ``args.split``), scored
    as the evaluation scores members."""
    from scidiff_datasets.grf import sample_fields

    from scidiff.evaluation.fidelity import ConditionFidelity
    from scidiff.inference.runtime import DistContext

    dm = datamodule(model, args)
    batch = dm.datasets[args.split].read_batch(np.asarray(dm.split_indices[args.split])[: args.samples])
    x = model.to_physical(batch["x"].double())
    params = dm.inverse_params(batch["params"]).double()
    names = list(model.metadata.param_names)
    n, a = params[:, names.index("spectral_index")].numpy(), params[:, names.index("amplitude")].numpy()
    noise = np.random.default_rng(7).standard_normal((len(x), args.members, *x.shape[2:]))
    draws = np.stack([sample_fields(noise[:, j], a, n) for j in range(args.members)], axis=1)
    fid = ConditionFidelity(encoder)
    fid.update(torch.from_numpy(draws)[:, :, None], x, params, None)
    return fid.results(DistContext())


def pm(s: dict[str, float], key: str) -> str:
    return f"{s[key]:.3f} ± {s[key + '_se']:.3f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="the trained quickstart run")
    p.add_argument("--data-path", type=Path, required=True, help="the quickstart's store (grf_quickstart.zarr)")
    p.add_argument("--out", type=Path, default=Path("."), help="where the encoder run (outputs/) goes")
    p.add_argument("--encoder-steps", type=int, default=1500)
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0])
    p.add_argument("--candidates", type=int, nargs="+", default=[8, 32, 128, 814])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--split", choices=["val", "train"], default="val",
                   help="whose conditions the model is scored on: the held-out band (val) or the training's (train)")
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--page", type=Path, default=None)
    args = p.parse_args(argv)
    args.out, args.data_path = args.out.resolve(), args.data_path.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    encoder_run = train_encoder(args)
    model = load_pretrained(args.model)
    encoder = load_contrastive(encoder_run)
    retrieval = encoder_retrieval(encoder, model, args)
    info = json.loads((encoder_run / "summary.json").read_text())
    perfect = exact_draws(encoder, model, args)
    rows = []
    for scale in args.scales:
        settings = EvaluationSettings(split=args.split, max_samples=args.samples, batch_size=32, seed=0,
                                      bound=BoundSettings(enabled=False),
                                      sampling=SamplingSettings(members=args.members),
                                      sampler=DPMSolver(steps=20, order=2), guidance=GuidanceSpec(scale=scale),
                                      fidelity=FidelitySettings(encoder=str(encoder_run)))
        s = evaluate(model, settings, data_path=args.data_path, device="cpu", progress=False).scalars
        if not rows:
            which = "held-out" if args.split == "val" else "training"
            rows.append([f"real {which} fields (1 per condition, {s['fidelity/candidates']:.0f} conditions)",
                         *(pm(s, f"fidelity/real_{k}") for k in ("top1", "top5", "similarity")), *["-"] * 5])
            rows.append([f"exact draws of the generator ({args.members} per condition)",
                         *(pm(perfect, f"fidelity/{k}") for k in ("top1", "top5", "similarity")), *["-"] * 5])
            print("real fields: " + ", ".join(rows[0][1:4]) + " | exact draws: " + ", ".join(rows[1][1:4]), flush=True)
        ev_line = (f"guidance {scale:g}: fidelity top-1 {pm(s, 'fidelity/top1')} top-5 {pm(s, 'fidelity/top5')} "
                   f"similarity {pm(s, 'fidelity/similarity')} | spectral {s['spectral_error/field']:.4f} (floor "
                   f"{s['floor/spectral_error/field']:.4f}) | CRPS {s['crps/field']:.4f} (floor "
                   f"{s['floor/crps/field']:.4f}) | std ratio {s['std_ratio/field']:.3f}")
        print(ev_line, flush=True)
        rows.append([f"model, guidance {scale:g}", *(pm(s, f"fidelity/{k}") for k in ("top1", "top5", "similarity")),
                     f"{s['spectral_error/field']:.4f}", f"{s['floor/spectral_error/field']:.4f}",
                     f"{s['crps/field']:.4f}", f"{s['floor/crps/field']:.4f}", f"{s['std_ratio/field']:.3f}"])
    if args.page:
        from page import command, hardware, markdown_table, software, write_page

        summary = (
            f"A contrastive encoder (`experiment=quickstart_contrastive`, {info['global_step']} steps, batch 128; "
            "the quickstart's 16x16 GRFs against their parameters (n, A)) scores how well fields match their "
            "conditions. First table: how often a real held-out field (the band n in [2.0, 2.5] the quickstart "
            "model never saw) retrieves its own parameters among K candidates of that band (mean over 20 random "
            "candidate sets). Second table: the quickstart model on the first "
            f"{args.samples} fields of {'that band' if args.split == 'val' else 'its training split'}, "
            f"{args.members} members each, DPM-Solver++ 2M at 20 calls, at "
            "several guidance scales: 0 is the model's unconditional prediction (its null condition), 1 the "
            "conditional model, above 1 guided. Fidelity: a member retrieving its own condition among the "
            "evaluation's distinct conditions, and its mean cosine similarity with it (each ± its standard error "
            "over the conditions), beside the real fields' (one per condition) and beside "
            f"{args.members} exact draws of the generator at each condition (what a perfect model scores with this "
            "imperfect encoder); quality: spectral error and CRPS beside their noise floor."
        )
        t1 = markdown_table(["candidates K", "top-1", "chance", "top-5", "chance"], retrieval)
        t2 = markdown_table(["fields", "top-1", "top-5", "similarity", "spectral error", "floor", "CRPS", "floor",
                             "std ratio"], rows)
        write_page(args.page, "Conditional fidelity (a CLIP score for fields) and guidance", summary,
                   command(__file__, sys.argv[1:] if argv is None else argv), t1 + "\n\n" + t2,
                   hardware_line=hardware(), software_line=software())


if __name__ == "__main__":
    main()
