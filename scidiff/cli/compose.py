"""Where the Hydra config tree is, and composing one of its top-level configs.

Every command composes its config with Hydra's compose API first (``scidiff-train``
to check it before Hydra runs; ``scidiff-sample``, ``-evaluate`` and ``-invert`` only
this way, so they never change directory or create run directories). Composition
errors become one-line :class:`~scidiff.cli.errors.ConfigError` messages.
"""

from __future__ import annotations

import os
from pathlib import Path


def config_dir() -> Path:
    """The Hydra config tree: ``$SCIDIFF_CONFIG_DIR``, else the source checkout's
    ``configs/`` (editable installs), else the copy installed with the package."""
    if os.environ.get("SCIDIFF_CONFIG_DIR"):
        return Path(os.environ["SCIDIFF_CONFIG_DIR"])
    checkout = Path(__file__).resolve().parents[2] / "configs"
    if (checkout / "train.yaml").is_file():
        return checkout
    return Path(__file__).resolve().parents[1] / "_configs"


CONFIG_DIR = config_dir()


def overrides(argv: list[str]) -> list[str]:
    """The ``key=value`` overrides of a command line (flags such as ``--cfg`` dropped)."""
    return [a for a in argv if not a.startswith("-")]


def compose_config(name: str, argv: list[str], *, return_hydra_config: bool = False):
    """``configs/<name>.yaml`` with the command line's overrides; errors as ``ConfigError``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from scidiff.cli.errors import ConfigError, from_hydra

    if not (CONFIG_DIR / f"{name}.yaml").is_file():
        raise ConfigError(f"configs: {CONFIG_DIR / f'{name}.yaml'} not found (set SCIDIFF_CONFIG_DIR)")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(name, overrides=overrides(argv), return_hydra_config=return_hydra_config)
    except ConfigError:
        raise
    except Exception as exc:  # hydra.errors.*, omegaconf.errors.*: all multi-line
        raise from_hydra(exc) from None
    finally:
        GlobalHydra.instance().clear()


def to_plain(cfg) -> dict:
    """The resolved config as plain python (interpolation errors as one-line ``ConfigError``)."""
    from omegaconf import OmegaConf

    from scidiff.cli.errors import from_hydra

    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception as exc:
        raise from_hydra(exc) from None
