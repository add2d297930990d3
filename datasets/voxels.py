"""Small molecules as voxelised Gaussian atomic densities, one channel per element.

For each SMILES (``smiles.txt`` by default): RDKit adds hydrogens, embeds one conformer
with ETKDGv3 (seeded, one thread) and optimises it with MMFF94. Coordinates [angstrom]
are centred on the heavy-atom centroid and rotated onto the heavy atoms' principal axes
(largest spread along x; signs fixed by the third moments, right-handed); each pose
is then optionally rotated by a uniform random rotation (seeded per molecule and pose).

Density of element E at voxel v [angstrom^-3]:

    rho_E(v) = sum_{atoms a of E} prod_{axis i} g_i(a, v) / spacing,
    g_i(a, v) = [erf((u_hi - c_ai) / (sqrt(2) sigma)) - erf((u_lo - c_ai) / (sqrt(2) sigma))] / 2 / Z_ai

i.e. an isotropic Gaussian of width ``sigma`` integrated exactly over each voxel
``[u_lo, u_hi]`` per axis, with ``Z_ai`` the mass of that axis inside the box (poses keep
every atom ``3 sigma`` from the faces, so ``Z`` differs from 1 by < 0.3 %). Hence
``rho_E.sum() * spacing**3`` equals the number of atoms of element E.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
import xarray as xr
from scipy.special import erf

from ._store import SAMPLE_DIM, Block, StoreSpec, base_attrs, lazy, sample_chunk

log = logging.getLogger(__name__)

HEAVY_ELEMENTS = {"C": 6, "N": 7, "O": 8, "F": 9}
HYDROGEN = {"H": 1}
SPATIAL_DIMS = ("z", "y", "x")
PADDING_ELEMENT = -1
BOX_MARGIN_SIGMAS = 3.0


@dataclass(frozen=True)
class VoxelSettings:
    grid: int = 32  # voxels per side
    spacing: float = 0.5  # angstrom
    sigma: float = 0.5  # angstrom, Gaussian width of an atom
    rotations: int = 1  # poses per molecule
    rotate: bool = True  # random rotations; False: the principal-axes pose only
    hydrogens: bool = False  # add a density_H channel and list H atoms
    max_molecules: int | None = None  # first M molecules of the list
    smiles_file: Path | None = None  # default: the shipped smiles.txt

    def __post_init__(self):
        if self.grid < 4:
            raise ValueError(f"grid must be >= 4, got {self.grid}")
        if not 0.25 <= self.spacing <= 0.5:
            raise ValueError(f"spacing must be in [0.25, 0.5] angstrom, got {self.spacing}")
        if self.sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if self.rotations < 1:
            raise ValueError(f"rotations must be >= 1, got {self.rotations}")
        if self.max_molecules is not None and self.max_molecules < 1:
            raise ValueError(f"max_molecules must be >= 1, got {self.max_molecules}")
        if self.smiles_file is not None and not Path(self.smiles_file).is_file():
            raise FileNotFoundError(f"SMILES file {self.smiles_file} does not exist")

    @property
    def elements(self) -> dict[str, int]:
        return {**HEAVY_ELEMENTS, **(HYDROGEN if self.hydrogens else {})}

    @property
    def poses(self) -> int:
        return self.rotations if self.rotate else 1

    def replace(self, **changes) -> "VoxelSettings":
        return dataclasses.replace(self, **changes)


SIZES = {
    "tiny": VoxelSettings(max_molecules=16),
    "small": VoxelSettings(),
    "full": VoxelSettings(rotations=16),
}


def read_smiles(path: Path | None = None) -> list[tuple[str, str]]:
    """(smiles, name) per molecule line of a SMILES file; '#' lines and blank lines skipped."""
    text = Path(path).read_text() if path is not None else files(__package__).joinpath("smiles.txt").read_text()
    molecules = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            smiles, _, name = line.partition(" ")
            molecules.append((smiles, name.strip()))
    return molecules


@dataclass(frozen=True)
class Molecule:
    index: int  # line among the molecule lines of the SMILES file
    smiles: str  # canonical
    positions: np.ndarray  # [atoms, 3] angstrom, centred, principal-axes frame
    atomic_numbers: np.ndarray  # [atoms]
    num_heavy_atoms: int
    molecular_weight: float  # g mol-1
    tpsa: float  # angstrom2
    descriptors: np.ndarray  # [len(DESCRIPTORS)] float64, RDKit descriptors of the molecule (a conditioning vector)


# The molecule's descriptor vector (the store's ``descriptors``, dims (sample, descriptor)): name, units,
# and how it is computed from the RDKit molecule without hydrogens.
DESCRIPTORS = {
    "molecular_weight": ("g mol-1", lambda m, D, R: D.MolWt(m)),
    "heavy_atoms": ("1", lambda m, D, R: m.GetNumHeavyAtoms()),
    "carbon_atoms": ("1", lambda m, D, R: sum(a.GetSymbol() == "C" for a in m.GetAtoms())),
    "nitrogen_atoms": ("1", lambda m, D, R: sum(a.GetSymbol() == "N" for a in m.GetAtoms())),
    "oxygen_atoms": ("1", lambda m, D, R: sum(a.GetSymbol() == "O" for a in m.GetAtoms())),
    "fluorine_atoms": ("1", lambda m, D, R: sum(a.GetSymbol() == "F" for a in m.GetAtoms())),
    "hydrogen_bond_donors": ("1", lambda m, D, R: R.CalcNumHBD(m)),
    "hydrogen_bond_acceptors": ("1", lambda m, D, R: R.CalcNumHBA(m)),
    "rotatable_bonds": ("1", lambda m, D, R: R.CalcNumRotatableBonds(m)),
    "rings": ("1", lambda m, D, R: R.CalcNumRings(m)),
    "aromatic_rings": ("1", lambda m, D, R: R.CalcNumAromaticRings(m)),
    "fraction_sp3_carbon": ("1", lambda m, D, R: R.CalcFractionCSP3(m)),
    "tpsa": ("angstrom2", lambda m, D, R: R.CalcTPSA(m)),
    "logp": ("1", lambda m, D, R: D.MolLogP(m)),
    "molar_refractivity": ("cm3 mol-1", lambda m, D, R: D.MolMR(m)),
    "labute_asa": ("angstrom2", lambda m, D, R: R.CalcLabuteASA(m)),
}


def embed(index: int, smiles: str, seed: int) -> Molecule | None:
    """ETKDGv3 + MMFF94 conformer in the centred principal-axes frame; None if RDKit fails."""
    from rdkit import Chem
    from rdkit.Chem import AllChem, Descriptors, rdMolDescriptors

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        log.warning("molecule %d: RDKit cannot parse %r", index, smiles)
        return None
    symbols = {a.GetSymbol() for a in mol.GetAtoms()}
    if not symbols <= set(HEAVY_ELEMENTS) | set(HYDROGEN):
        log.warning("molecule %d (%s): elements %s outside C, N, O, F, H", index, smiles, sorted(symbols))
        return None
    mol_h = Chem.AddHs(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = (seed * 1_000_003 + index) % 2**31
    params.numThreads = 1
    if AllChem.EmbedMolecule(mol_h, params) != 0:
        log.warning("molecule %d (%s): embedding failed", index, smiles)
        return None
    if AllChem.MMFFHasAllMoleculeParams(mol_h):
        AllChem.MMFFOptimizeMolecule(mol_h, maxIters=2000)
    else:
        log.warning("molecule %d (%s): no MMFF parameters, keeping the ETKDG geometry", index, smiles)
    positions = mol_h.GetConformer().GetPositions()  # [atoms, 3] angstrom
    z = np.array([a.GetAtomicNum() for a in mol_h.GetAtoms()])
    heavy = z > 1
    centred = positions - positions[heavy].mean(axis=0)
    _, axes = np.linalg.eigh(np.cov(centred[heavy].T, bias=True) if heavy.sum() > 1 else np.eye(3))
    axes = axes[:, ::-1]  # largest variance first -> x
    proj = centred[heavy] @ axes
    signs = np.where((proj**3).sum(axis=0) < 0, -1.0, 1.0)
    axes = axes * signs
    if np.linalg.det(axes) < 0:
        axes[:, 2] *= -1
    order = np.argsort(~heavy, kind="stable")  # heavy atoms first
    return Molecule(
        index=index,
        smiles=Chem.MolToSmiles(mol),
        positions=(centred @ axes)[order],
        atomic_numbers=z[order],
        num_heavy_atoms=mol.GetNumHeavyAtoms(),
        molecular_weight=Descriptors.MolWt(mol),
        tpsa=rdMolDescriptors.CalcTPSA(mol),
        descriptors=np.array([float(f(mol, Descriptors, rdMolDescriptors)) for _, f in DESCRIPTORS.values()]),
    )


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform rotation on SO(3): a normalised Gaussian quaternion, as a [3, 3] matrix."""
    w, x, y, z = (q := rng.standard_normal(4)) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def voxel_centres(grid: int, spacing: float) -> np.ndarray:
    return (np.arange(grid) - (grid - 1) / 2) * spacing


def atom_density(positions: np.ndarray, grid: int, spacing: float, sigma: float) -> np.ndarray:
    """Sum of voxel-integrated unit Gaussians at ``positions`` [atoms, 3] (x, y, z), float64 [z, y, x]
    in angstrom^-3; integrates (sum * spacing^3) to ``len(positions)``."""
    edges = (np.arange(grid + 1) - grid / 2) * spacing  # voxel faces
    scale = np.sqrt(2.0) * sigma
    cdf = 0.5 * erf((edges[None, None, :] - positions[:, :, None]) / scale)  # [atoms, 3, grid + 1]
    mass = np.diff(cdf, axis=-1)  # [atoms, 3, grid]
    mass /= mass.sum(axis=-1, keepdims=True) * spacing
    return np.einsum("az,ay,ax->zyx", mass[:, 2], mass[:, 1], mass[:, 0])


@dataclass(frozen=True)
class Pose:
    molecule: Molecule
    positions: np.ndarray  # [atoms, 3] rotated, kept atoms only
    atomic_numbers: np.ndarray


def make_poses(settings: VoxelSettings, seed: int) -> tuple[list[Pose], dict[str, int]]:
    s = settings
    molecules = read_smiles(s.smiles_file)[: s.max_molecules]
    half = s.grid * s.spacing / 2 - BOX_MARGIN_SIGMAS * s.sigma
    poses, skipped = [], {"embed": 0, "box": 0}
    for index, (smiles, _) in enumerate(molecules):
        mol = embed(index, smiles, seed)
        if mol is None:
            skipped["embed"] += 1
            continue
        keep = mol.atomic_numbers > 1 if not s.hydrogens else np.ones(len(mol.atomic_numbers), bool)
        for pose in range(s.poses):
            rotation = random_rotation(np.random.default_rng([seed, index, pose])) if s.rotate else np.eye(3)
            positions = mol.positions[keep] @ rotation.T
            if np.abs(positions).max() > half:
                skipped["box"] += 1
                continue
            poses.append(Pose(mol, positions, mol.atomic_numbers[keep]))
    log.info("%d poses of %d molecules; skipped: %d molecules failed to embed, %d poses outside the box",
             len(poses), len(molecules), skipped["embed"], skipped["box"])
    if not poses:
        raise ValueError("no molecule fits the box: increase --spacing or --grid, or reduce --sigma")
    return poses, skipped


RDKIT_MISSING = ("the voxels generator needs RDKit, which is not installed: "
                 "pip install 'scidiff[molecules]' (or pip install rdkit)")


def require_rdkit() -> None:
    """Raise ``ModuleNotFoundError`` saying which extra to install when RDKit is missing."""
    try:
        import rdkit  # noqa: F401
    except ImportError:
        raise ModuleNotFoundError(RDKIT_MISSING, name="rdkit") from None


def make_store(settings: VoxelSettings, *, seed: int, size: str) -> StoreSpec:
    require_rdkit()
    s = settings
    poses, skipped = make_poses(s, seed)
    n = len(poses)
    max_atoms = max(len(p.atomic_numbers) for p in poses)
    atom_position = np.full((n, max_atoms, 3), np.nan, np.float32)
    atom_element = np.full((n, max_atoms), PADDING_ELEMENT, np.int8)
    for i, p in enumerate(poses):
        atom_position[i, : len(p.positions)] = p.positions
        atom_element[i, : len(p.atomic_numbers)] = p.atomic_numbers

    centres = voxel_centres(s.grid, s.spacing)
    coords = {
        d: (d, centres, {"units": "angstrom", "long_name": f"{d} of the voxel centre", "axis": d.upper()})
        for d in SPATIAL_DIMS
    }
    shape = (n,) + (s.grid,) * 3
    data_vars = {
        f"density_{e}": ((SAMPLE_DIM,) + SPATIAL_DIMS, lazy(shape, np.float32), {
            "units": "angstrom-3", "long_name": f"number density of {e} atoms (Gaussian width {s.sigma} angstrom)"})
        for e in s.elements
    }
    descriptors = {
        "num_heavy_atoms": ("1", "number of heavy (non-hydrogen) atoms", [p.molecule.num_heavy_atoms for p in poses]),
        "molecular_weight": ("g mol-1", "average molecular weight", [p.molecule.molecular_weight for p in poses]),
        "tpsa": ("angstrom2", "topological polar surface area", [p.molecule.tpsa for p in poses]),
    }
    for name, (units, long_name, values) in descriptors.items():
        values = np.asarray(values, np.float32)
        data_vars[name] = (SAMPLE_DIM, values, {"units": units, "long_name": long_name,
                                                "valid_min": float(values.min()), "valid_max": float(values.max())})
    data_vars["descriptors"] = ((SAMPLE_DIM, "descriptor"), np.stack([p.molecule.descriptors for p in poses]).astype(
        np.float32), {"units": "1", "long_name": "RDKit descriptors of the molecule (units per descriptor: "
                      "descriptor_units), a conditioning vector"})
    data_vars["atom_position"] = ((SAMPLE_DIM, "atom", "xyz"), atom_position, {
        "units": "angstrom", "long_name": "atom centre (x, y, z) in the grid frame; NaN pads"})
    data_vars["atom_element"] = ((SAMPLE_DIM, "atom"), atom_element, {
        "units": "1", "long_name": "atomic number; -1 pads",
        "flag_values": [PADDING_ELEMENT, *sorted(s.elements.values())],
        "flag_meanings": " ".join(["padding"] + [e for e, _ in sorted(s.elements.items(), key=lambda kv: kv[1])])})
    data_vars["smiles"] = (SAMPLE_DIM, np.array([p.molecule.smiles for p in poses], dtype=object),
                           {"long_name": "canonical SMILES"})
    data_vars["molecule_index"] = (SAMPLE_DIM, np.array([p.molecule.index for p in poses], np.int32), {
        "units": "1", "long_name": "0-based molecule line of the SMILES list"})

    template = xr.Dataset(
        data_vars,
        coords={SAMPLE_DIM: (SAMPLE_DIM, np.arange(n, dtype=np.int64), {"units": "1", "long_name": "sample index"}),
                "descriptor": ("descriptor", np.array(list(DESCRIPTORS)), {"long_name": "RDKit descriptor"}),
                "descriptor_units": ("descriptor", np.array([u for u, _ in DESCRIPTORS.values()]),
                                     {"long_name": "units of the descriptor"}),
                **coords},
        attrs=base_attrs(
            "voxels", seed, size,
            title="Small molecules (RDKit ETKDGv3 + MMFF94 conformers) as Gaussian atomic densities",
            parameters=" ".join(descriptors),
            fields=" ".join(f"density_{e}" for e in s.elements),
            spatial_dims=" ".join(SPATIAL_DIMS),
            grid=s.grid,
            spacing=s.spacing,
            sigma=s.sigma,
            elements=" ".join(s.elements),
            rotations=s.poses,
            random_rotations=int(s.rotate),
            hydrogens=int(s.hydrogens),
            skipped_embed=skipped["embed"],
            skipped_box=skipped["box"],
            box_margin="atoms at least 3 sigma inside the box faces",
            smiles_file=str(s.smiles_file) if s.smiles_file else "scidiff_datasets/smiles.txt",
        ),
    )

    def blocks() -> Iterator[Block]:
        step = sample_chunk((s.grid,) * 3, 4)
        for start in range(0, n, step):
            chunk = poses[start: start + step]
            out = {e: np.zeros((len(chunk),) + (s.grid,) * 3, np.float32) for e in s.elements}
            for k, p in enumerate(chunk):
                for e, z in s.elements.items():
                    atoms = p.positions[p.atomic_numbers == z]
                    if len(atoms):
                        out[e][k] = atom_density(atoms, s.grid, s.spacing, s.sigma)
            yield Block(start, xr.Dataset({f"density_{e}": ((SAMPLE_DIM,) + SPATIAL_DIMS, v) for e, v in out.items()}))

    return StoreSpec(template, blocks())
