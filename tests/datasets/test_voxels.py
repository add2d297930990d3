import numpy as np
import pytest
import xarray as xr
from rdkit import Chem
from rdkit.Chem import Descriptors, rdMolDescriptors

from scidiff_datasets import cli, voxels

ELEMENTS = {"C": 6, "N": 7, "O": 8, "F": 9}


def test_tiny_store_schema(tiny_store):
    ds = xr.open_zarr(tiny_store("voxels"))
    assert ds.sizes["sample"] == 16 and ds.sizes["xyz"] == 3
    for e in ELEMENTS:
        v = ds[f"density_{e}"]
        assert v.dims == ("sample", "z", "y", "x") and v.shape[1:] == (32, 32, 32)
        assert v.units == "angstrom-3"
    assert "density_H" not in ds
    units = {"num_heavy_atoms": "1", "molecular_weight": "g mol-1", "tpsa": "angstrom2",
             "atom_position": "angstrom", "x": "angstrom", "y": "angstrom", "z": "angstrom"}
    for name, unit in units.items():
        assert ds[name].units == unit, name
    assert ds.attrs["parameters"].split() == ["num_heavy_atoms", "molecular_weight", "tpsa"]
    assert ds.atom_position.dims == ("sample", "atom", "xyz")
    np.testing.assert_allclose(ds.x.values[[0, -1]], [-7.75, 7.75])  # spacing 0.5, centred
    assert ds.attrs["skipped_embed"] == 0


def test_densities_integrate_to_atom_counts(tiny_store):
    ds = xr.open_zarr(tiny_store("voxels")).load()
    dv = ds.attrs["spacing"] ** 3
    total = 0
    for e, z in ELEMENTS.items():
        counts = (ds.atom_element == z).sum("atom").values
        integral = ds[f"density_{e}"].sum(("z", "y", "x")).values * dv
        np.testing.assert_allclose(integral, counts, atol=1e-4)
        total += counts
    np.testing.assert_array_equal(total, ds.num_heavy_atoms.values)
    assert (ds.density_C.sum(("z", "y", "x")) > 0).all()


def test_density_is_centred_on_the_listed_atoms(tiny_store):
    ds = xr.open_zarr(tiny_store("voxels")).isel(sample=slice(0, 6)).load()
    zz, yy, xx = np.meshgrid(ds.z.values, ds.y.values, ds.x.values, indexing="ij")
    for j in range(6):
        pos, el = ds.atom_position.values[j], ds.atom_element.values[j]
        valid = el > 0
        assert np.isnan(pos[~valid]).all() and not np.isnan(pos[valid]).any()
        assert (el[valid] >= 6).all()
        # heavy-atom centroid at the origin (before rotation it is, and rotations keep it)
        np.testing.assert_allclose(pos[valid].mean(0), 0.0, atol=1e-4)
        rho = ds.density_C.values[j]
        centre = np.array([(rho * g).sum() / rho.sum() for g in (xx, yy, zz)])
        np.testing.assert_allclose(centre, pos[el == 6].mean(0), atol=1e-3)
        # a single-atom check: the density is largest in the voxel containing some C atom
        peak = np.unravel_index(rho.argmax(), rho.shape)
        peak_xyz = np.array([ds.x.values[peak[2]], ds.y.values[peak[1]], ds.z.values[peak[0]]])
        assert np.linalg.norm(pos[el == 6] - peak_xyz, axis=1).min() < 0.5


def test_descriptors_match_rdkit(tiny_store):
    ds = xr.open_zarr(tiny_store("voxels")).load()
    listed = voxels.read_smiles()
    for j in range(ds.sizes["sample"]):
        mol = Chem.MolFromSmiles(listed[int(ds.molecule_index[j])][0])
        assert Chem.MolToSmiles(mol) == str(ds.smiles.values[j])
        assert ds.num_heavy_atoms[j] == mol.GetNumHeavyAtoms()
        assert ds.molecular_weight[j] == pytest.approx(Descriptors.MolWt(mol), rel=1e-6)
        assert ds.tpsa[j] == pytest.approx(rdMolDescriptors.CalcTPSA(mol), rel=1e-6, abs=1e-6)
    assert ds.molecular_weight.values[0] == pytest.approx(180.16, abs=0.01)  # aspirin, line 0


def test_atom_density_normalisation_and_width():
    pos = np.array([[0.1, -0.3, 0.2]])
    rho = voxels.atom_density(pos, grid=40, spacing=0.25, sigma=0.5)
    c = voxels.voxel_centres(40, 0.25)
    assert rho.sum() * 0.25**3 == pytest.approx(1.0, abs=1e-12)
    marginal_x = rho.sum(axis=(0, 1)) * 0.25**2  # density along x, integrates to 1
    mean = (marginal_x * c).sum() * 0.25
    var = (marginal_x * (c - mean) ** 2).sum() * 0.25
    assert mean == pytest.approx(0.1, abs=1e-9)
    assert var == pytest.approx(0.5**2 + 0.25**2 / 12, rel=1e-3)  # Gaussian + voxel-averaging (Sheppard)


def test_rotations_are_rigid_and_uniform_and_hydrogens(tmp_path):
    settings = voxels.VoxelSettings(max_molecules=3, rotations=4, hydrogens=True)
    poses, skipped = voxels.make_poses(settings, seed=5)
    assert len(poses) + skipped["box"] == 12 and skipped["embed"] == 0
    by_mol = {}
    for p in poses:
        by_mol.setdefault(p.molecule.index, []).append(p)
    for group in by_mol.values():
        d0 = np.linalg.norm(group[0].positions[:, None] - group[0].positions[None], axis=-1)
        for p in group[1:]:
            d = np.linalg.norm(p.positions[:, None] - p.positions[None], axis=-1)
            np.testing.assert_allclose(d, d0, atol=1e-9)
            assert not np.allclose(p.positions, group[0].positions)
        assert (group[0].atomic_numbers == 1).any()
    rots = np.stack([voxels.random_rotation(np.random.default_rng(i)) for i in range(2000)])
    np.testing.assert_allclose(rots @ rots.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rots.shape), atol=1e-12)
    # Haar measure: E[R] = 0 and the trace has mean 0 (E[tr R] = 0 on SO(3))
    assert np.abs(rots.mean(0)).max() < 0.06
    assert abs(np.trace(rots, axis1=1, axis2=2).mean()) < 0.08


def test_molecules_outside_the_box_are_skipped_and_counted(tmp_path):
    out = tmp_path / "small_box.zarr"
    cli.main(["voxels", "--out", str(out), "--size", "tiny", "--grid", "20", "--spacing", "0.5", "-q"])
    ds = xr.open_zarr(out)
    assert ds.attrs["skipped_box"] > 0
    assert ds.sizes["sample"] + ds.attrs["skipped_box"] == 16
    half = 20 * 0.5 / 2 - 3 * 0.5
    assert float(np.nanmax(np.abs(ds.atom_position.values))) <= half
    with pytest.raises(SystemExit):
        cli.main(["voxels", "--out", str(tmp_path / "none.zarr"), "--size", "tiny", "--grid", "4", "-q"])
