"""One benchmark page of the documentation site, written by the script that measured it.

Every measuring script (``workflows/benchmarks/*.py``, ``workflows/quickstart_quality.py``,
``workflows/grf_likelihood.py``, ``workflows/grf_conditional.py``) takes ``--page PATH``,
e.g. ``--page docs/benchmarks/denoiser-throughput.md``, and calls :func:`write_page` with
what it measured. The scripts import this module from their own directory (workflows are
not part of the package)::

    sys.path.insert(0, str(Path(__file__).resolve().parent))      # workflows/benchmarks/
    from page import write_page

Every page has the same layout (the hand-written pages of ``docs/benchmarks/`` too)::

    # <title>

    <summary: what is measured, how>

    - **Date:** 2026-11-30
    - **Hardware:** <CPU model> (<n> CPUs visible, <k> torch threads), Linux x86_64
    - **Software:** Python 3.11.7, torch 2.13.0+cpu
    - **Command:** `python workflows/... --page docs/benchmarks/<name>.md`

    ## Result

    <the tables the script printed>

    <!-- MARKER -->

    <discussion, written by hand>

Everything above the marker is rewritten when the script runs again; everything from the
marker down is kept from the page being replaced, so the discussion written by hand
survives (reread it against the new numbers).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER = (
    "<!-- page.py: everything above this line is rewritten when the page is regenerated "
    "with --page; everything below it is kept. -->"
)


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` where there is one, else ``platform``'s guess."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def hardware(device: str | None = None) -> str:
    """The machine in one line: CPU model, CPUs visible, torch threads, OS; the GPU for ``cuda``."""
    threads = ""
    gpu = ""
    with contextlib.suppress(ImportError):
        import torch

        threads = f", {torch.get_num_threads()} torch threads"
        if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
            gpu = f"{torch.cuda.get_device_name(torch.device(device))}; "
    return (f"{gpu}{cpu_name()} ({os.cpu_count()} CPUs visible{threads}), "
            f"{platform.system()} {platform.machine()}")


def software(extra: Mapping[str, str] | None = None) -> str:
    """Python and torch versions, then ``extra`` (``{"diffusers": "0.42.1"}``)."""
    parts = [f"Python {platform.python_version()}"]
    with contextlib.suppress(ImportError):
        import torch

        parts.append(f"torch {torch.__version__}")
    parts += [f"{name} {version}" for name, version in (extra or {}).items()]
    return ", ".join(parts)


def command(script: str | os.PathLike, argv: Sequence[str] | None = None) -> str:
    """The command line that ran ``script`` with ``argv`` (default: this process's arguments).

    The script is named relative to the repository root when it lies inside it, so the
    command reads the same on every machine: ``python workflows/benchmarks/x.py --flag``.
    """
    path = Path(script).resolve()
    with contextlib.suppress(ValueError):
        path = path.relative_to(ROOT)
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", str(path), *args])


def _cell(value: object) -> str:
    # a | outside code spans would end the cell; inside them the table parser leaves it alone
    parts = str(value).replace("\n", " ").split("`")
    return "`".join(p if i % 2 else p.replace("|", "\\|") for i, p in enumerate(parts))


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table; a ``|`` inside a cell (outside code spans) is escaped."""
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "---|" * len(header)]
    for row in rows:
        cells = list(row)
        if len(cells) != len(header):
            raise ValueError(f"a row has {len(cells)} cells, the header {len(header)}: {cells}")
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def render_page(title: str, summary: str, cmd: str, result: str, *, date: str | None = None,
                hardware_line: str | None = None, software_line: str | None = None,
                notes: str = "") -> str:
    """The page's text (see the module docstring); ``date`` defaults to today."""
    if "`" in cmd:
        raise ValueError(f"the command cannot hold a backtick: {cmd}")
    date = date or datetime.date.today().isoformat()
    head = [
        f"# {title.strip()}",
        "",
        summary.strip(),
        "",
        f"- **Date:** {date}",
        f"- **Hardware:** {hardware_line or hardware()}",
        f"- **Software:** {software_line or software()}",
        f"- **Command:** `{cmd}`",
        "",
        "## Result",
        "",
        result.strip(),
        "",
        MARKER,
        "",
    ]
    text = "\n".join(head)
    if notes.strip():
        text += notes.strip() + "\n"
    return text


def kept_notes(path: str | os.PathLike) -> str | None:
    """What follows the marker in an existing page (``None`` when there is no page or marker)."""
    p = Path(path)
    if not p.is_file():
        return None
    text = p.read_text(encoding="utf-8")
    if MARKER not in text:
        return None
    return text.split(MARKER, 1)[1]


def write_page(path: str | os.PathLike, title: str, summary: str, cmd: str, result: str, *,
               date: str | None = None, hardware_line: str | None = None,
               software_line: str | None = None, notes: str = "") -> Path:
    """Write the benchmark page to ``path``, keeping the hand-written part of the page it replaces.

    Args:
        path: the page, e.g. ``docs/benchmarks/denoiser-throughput.md`` (folders are created).
        title: the page's title (its only level-1 heading).
        summary: what was measured and how, in a few sentences of markdown.
        cmd: the exact command (:func:`command`).
        result: the tables the script printed, as markdown (:func:`markdown_table`).
        date: ISO date (default: today).
        hardware_line, software_line: default :func:`hardware` and :func:`software`.
        notes: the discussion below the marker for a new page; an existing page's is kept.

    Returns:
        The path written.
    """
    p = Path(path)
    old = kept_notes(p)
    text = render_page(title, summary, cmd, result, date=date, hardware_line=hardware_line,
                       software_line=software_line, notes="" if old is not None else notes)
    if old is not None:
        text = text.rstrip("\n") + old if old.strip() else text
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)
    print(f"wrote the benchmark page {p}", flush=True)
    return p
