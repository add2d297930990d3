"""scidiff: denoising diffusion (DDPM/DDIM) for scientific fields of any spatial rank.

Subpackages: ``diffusion`` (the mathematics, torch only), ``nets`` (denoisers),
``data`` (xarray/zarr data), ``training`` (Lightning), ``sampling`` (ensembles to
zarr), ``evaluation`` (metrics, likelihoods, MLflow reports) and ``cli``.
"""

from importlib.metadata import PackageNotFoundError, version

from scidiff.conditioning import Conditioning

try:
    __version__ = version("scidiff")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["Conditioning", "__version__"]
