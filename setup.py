"""Package discovery that pyproject.toml alone cannot express.

The bundled dataset generators live in the top-level ``datasets/`` folder (see
DESIGN.md) and are installed as ``scidiff_datasets``: a top-level package named
``datasets`` would shadow Hugging Face's library of that name.
"""

from setuptools import find_packages, setup

generator_packages = ["scidiff_datasets"] + [
    f"scidiff_datasets.{name}" for name in find_packages("datasets")
]
setup(
    packages=find_packages(include=["scidiff", "scidiff.*"]) + generator_packages,
    package_dir={"scidiff_datasets": "datasets"},
    package_data={"scidiff_datasets": ["*.txt", "*.csv", "*.smi"]},
)
