"""``scidiff-embed``: a contrastive encoder's embeddings of a store's samples, into a copy of it.

    scidiff-embed encoder=outputs/quickstart_contrastive/clip input=grf.zarr out=grf_clip.zarr of=fields
    scidiff-train experiment=quickstart data.path=grf_clip.zarr data.params=[] 'data.embedding={name: clip_embedding, transform: none}'

The config (``configs/embed.yaml``) is composed with Hydra's compose API and checked first: an
unknown key, a wrong type, a missing file or an ``out`` that exists is one line naming the key,
exit status 2 (:mod:`scidiff.sampling.embed` says what is written).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from scidiff.cli.compose import compose_config as compose
from scidiff.cli.compose import to_plain

USAGE = __doc__


@dataclasses.dataclass
class EmbedConfig:
    """Top-level keys of ``configs/embed.yaml``."""

    encoder: str
    tracking_uri: str | None
    input: str
    of: Literal["fields", "conditions"]
    name: str
    out: str
    overwrite: bool
    batch_size: int
    device: str


def compose_config(argv: list[str]):
    return compose("embed", argv)


def check_config(cfg) -> dict[str, Any]:
    from scidiff.cli.config_check import check_dataclass
    from scidiff.cli.errors import ConfigError

    plain = to_plain(cfg)
    for key in ("encoder", "input", "out"):
        if plain.get(key) in (None, "???"):
            raise ConfigError(f"{key}: required ({key}=<{'a contrastive encoder run' if key == 'encoder' else 'a store'}>)")
        plain[key] = str(plain[key])
    check_dataclass(plain, EmbedConfig, "")
    if plain["batch_size"] < 1:
        raise ConfigError(f"batch_size: expected a positive integer, got {plain['batch_size']}")
    if not plain["name"].isidentifier():
        raise ConfigError(f"name: expected a variable name (letters, digits, _), got {plain['name']!r}")
    if not Path(plain["input"]).exists() and "://" not in plain["input"]:
        raise ConfigError(f"input: {plain['input']} does not exist")
    out = Path(plain["out"])
    if out.exists() and not plain["overwrite"]:
        raise ConfigError(f"out: {out} already exists (overwrite=true to replace it)")
    if "://" not in plain["input"] and out.resolve() == Path(plain["input"]).resolve():
        raise ConfigError(f"out: {out} is the input store (the embedding goes into a copy)")
    return plain


def run(plain: dict[str, Any]) -> None:
    from scidiff.sampling.embed import embed_store

    print(embed_store(plain)["line"], flush=True)


def main(argv: list[str] | None = None) -> None:
    from scidiff.cli.runner import Command, run_command
    from scidiff.inference.checkpoint import CheckpointError
    from scidiff.inference.runtime import DeviceError
    from scidiff.sampling.embed import EmbedError

    run_command(Command("embed", USAGE, lambda cfg: check_config(cfg), run,
                        input_errors=(EmbedError, CheckpointError, DeviceError)), argv)


if __name__ == "__main__":
    main()
