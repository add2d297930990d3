"""The fast paths (``execution.*``) on the machine at hand: members/s of a trained model.

Loads a quickstart checkpoint once per execution (float32; ``compile``; ``bf16``; ``bf16`` +
``compile``; ``channels_last``) and generates the same ensemble through
:func:`scidiff.sampling.ensemble.run_ensemble` (what ``scidiff-sample`` runs: 3 parameter sets,
``--members`` each, DDIM ``--steps``) at two micro-batch sizes. Reported: the best of
``--rounds`` alternating rounds in members/s, its ratio to float32, the first run's time (where
``torch.compile`` compiles) and the members' relative RMS difference from float32's (same seeds).

    python workflows/benchmarks/execution_speed.py outputs/quickstart/<run> --page docs/benchmarks/execution-cpu.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from scidiff.inference import load_pretrained
from scidiff.sampling.grid import ParameterSets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampling_throughput import timed_ensemble  # noqa: E402

EXECUTIONS = {
    "float32": {},
    "compile": {"compile": True},
    "bf16": {"precision": "bf16"},
    "bf16 + compile": {"precision": "bf16", "compile": True},
    "channels_last": {"channels_last": True},
}


def generate(pretrained, sets, members: int, steps: int, micro_batch: int) -> tuple[float, np.ndarray]:
    """Seconds of one ensemble into a fresh store (as ``scidiff-sample`` writes it), and its members."""
    return timed_ensemble(pretrained, sets, members, steps, 1.0, batch_invariant=True, micro_batch=micro_batch,
                          batch_size=micro_batch)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a quickstart run directory")
    p.add_argument("--members", type=int, default=64, help="members per parameter set (3 sets)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--micro-batches", type=int, nargs="+", default=[16, 128])
    p.add_argument("--executions", nargs="+", default=list(EXECUTIONS), choices=list(EXECUTIONS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--page", type=Path, default=None)
    args = p.parse_args(argv)
    models = {name: load_pretrained(args.run, execution=EXECUTIONS[name]) for name in args.executions}
    names = next(iter(models.values())).param_names
    sets = ParameterSets(names=tuple(names), values=np.array([[2.1, 1.0], [2.25, 1.0], [2.4, 1.0]])[:, :len(names)])
    total = len(sets) * args.members
    rows = []
    for mb in args.micro_batches:
        first, best, members = {}, {}, {}
        for name, pre in models.items():  # the first run: compilation for the compiled ones
            first[name], members[name] = generate(pre, sets, args.members, args.steps, mb)
            best[name] = float("inf")
        for _ in range(args.rounds):
            for name, pre in models.items():
                best[name] = min(best[name], generate(pre, sets, args.members, args.steps, mb)[0])
        ref = members[args.executions[0]]
        for name in models:
            diff = float(np.sqrt(np.mean((members[name] - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))
            rows.append([name, mb, f"{total / best[name]:.1f}", f"**{best[args.executions[0]] / best[name]:.2f}**",
                         f"{first[name]:.1f}", f"{diff:.1e}"])
            print(f"micro_batch {mb:4d} {name:16s} {total / best[name]:8.1f} members/s "
                  f"(x{best[args.executions[0]] / best[name]:.2f}), first run {first[name]:.1f} s, "
                  f"members' relative difference {diff:.1e}", flush=True)
    if args.page:
        from page import command, hardware, markdown_table, software, write_page

        summary = (
            f"Members per second of `run_ensemble` (what `scidiff-sample` runs) for the quickstart checkpoint "
            f"({' x '.join(map(str, models[args.executions[0]].metadata.spatial_shape))} fields), {total} members, "
            f"DDIM {args.steps} steps, with each `execution` setting, at two `micro_batch` sizes. Best of "
            f"{args.rounds} alternating rounds; the first run (where `torch.compile` compiles) is timed apart; the "
            f"last column is the members' relative RMS difference from float32's (the same seeds)."
        )
        table = markdown_table(["execution", "micro_batch", "members/s", "x float32", "first run (s)",
                                "difference from float32"], rows)
        write_page(args.page, "Fast paths on CPU", summary, command(__file__, sys.argv[1:] if argv is None else argv),
                   table, hardware_line=hardware(), software_line=software())
    return 0


if __name__ == "__main__":
    sys.exit(main())
