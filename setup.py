"""Package discovery that pyproject.toml alone cannot express.

The Hydra config tree (top-level ``configs/``) is installed as package data under
``scidiff/_configs``, so the console scripts find it outside a source checkout.
The bundled dataset generators live in the top-level ``datasets/`` folder (see
docs/architecture.md) and are installed as ``scidiff_datasets``: a top-level package named
``datasets`` would shadow Hugging Face's library of that name.
"""

from setuptools import find_packages, setup

generator_packages = ["scidiff_datasets"] + [
    f"scidiff_datasets.{name}" for name in find_packages("datasets")
]
setup(
    packages=find_packages(include=["scidiff", "scidiff.*"]) + generator_packages + ["scidiff._configs"],
    package_dir={"scidiff_datasets": "datasets", "scidiff._configs": "configs"},
    package_data={"scidiff_datasets": ["*.txt", "*.csv", "*.smi"], "scidiff._configs": ["**/*.yaml", "**/*.md"]},
)
