"""One-line error reports for the command-line tools.

A ``ConfigError`` names the config key (``trainer.max_steps``) or the file it is
about; the CLI prints ``error: <message>`` on one line and exits with status 2.
Unexpected failures print one line too and keep the traceback in a log file.
"""

from __future__ import annotations

import re
import sys
import traceback
from pathlib import Path


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key or the file."""


def one_line(message: str) -> str:
    return re.sub(r"\s+", " ", str(message)).strip()


SUBMITIT_MISSING = ("hydra/launcher: the SLURM and submitit launchers (configs/hydra/launcher/) need the "
                    "hydra-submitit-launcher plugin: pip install 'scidiff[cluster]'")


def _has_submitit() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except (ImportError, ValueError):  # hydra_plugins itself missing, or a None entry in sys.modules
        return False


def from_hydra(exc: BaseException) -> ConfigError:
    """Turn Hydra/OmegaConf composition errors (several lines, often with a hint about
    HYDRA_FULL_ERROR) into one line naming the key or the config option."""
    text = str(exc)
    plugin = re.search(r"Could not (?:find|load) 'hydra/launcher/submitit_", text)
    if plugin and not _has_submitit():
        return ConfigError(SUBMITIT_MISSING)
    missing = re.search(r"Could not find '([^']+)'", text)
    if missing:
        group, _, option = missing.group(1).rpartition("/")
        listed = text.split("Available options", 1)[-1].split("Config search path", 1)[0]
        options = re.findall(r"^\t(\S+)$", listed, flags=re.M) if "Available options" in text else []
        known = f"; available: {', '.join(options)}" if options else ""
        if group:
            return ConfigError(f"{group}={option}: no such config in configs/{group}/{known}")
        return ConfigError(f"no such config: {missing.group(1)}{known}")
    key = re.search(r"Key '([^']+)' is not in struct", text)
    full_key = re.search(r"full_key: (\S+)", text)
    override = re.search(r"Could not override '([^']+)'", text)
    if override and ("not in struct" in text or "To append to your config" in text):
        name = override.group(1)
        return ConfigError(f"{name}: unknown config key (a typo? to add a new key use +{name}=...)")
    if key:
        name = full_key.group(1) if full_key else key.group(1)
        return ConfigError(f"{name}: unknown config key (a typo? to add a new key use +{name}=...)")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if override:
        return ConfigError(f"{override.group(1)}: {one_line(text.split(chr(10), 1)[-1])}")
    if full_key:
        return ConfigError(f"{full_key.group(1)}: {one_line(first)}")
    return ConfigError(one_line(text))


def report_and_exit(exc: BaseException, log_dir: Path | None = None, status: int = 1) -> None:
    """Print ``error: ...`` as one line on stderr (full traceback in ``log_dir/error.log``)."""
    where = ""
    if log_dir is not None and not isinstance(exc, ConfigError):
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            path = log_dir / "error.log"
            path.write_text("".join(traceback.format_exception(exc)))
            where = f" (traceback in {path})"
        except OSError:
            pass
    from scidiff.cli.runlog import console_print

    kind = "" if isinstance(exc, ConfigError) else f"{type(exc).__name__}: "
    console_print(f"error: {kind}{one_line(str(exc))}{where}")
    sys.exit(status)


def one_line_warnings() -> None:
    """Show Python warnings as ``warning: <message>`` (one line, rank 0 only) instead of
    the file, line number and source line of where they were raised."""
    import os
    import warnings

    from scidiff.cli.runlog import console_print

    def show(message, category, filename, lineno, file=None, line=None):
        if os.environ.get("RANK", "0") == "0":
            console_print(f"warning: {one_line(str(message))}")

    warnings.showwarning = show
