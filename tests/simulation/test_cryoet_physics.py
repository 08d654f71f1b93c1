"""Cryo-ET simulator physics against closed forms and independent references (not its own earlier output)."""

from __future__ import annotations

import math
from pathlib import Path

import gemmi
import numpy as np
import pytest
from scipy import ndimage

from em_platform import simulation
from em_platform.simulation.cryoet import physics
from em_platform.simulation.cryoet.assembly import PlacedParticle, Sample
from em_platform.simulation.cryoet.detector import Detector, micrographs
from em_platform.simulation.cryoet.image_formation import Grid, Ice, Optics, TiltGeometry, TiltImager
from em_platform.simulation.cryoet.models import ParticleModel, load_atomic_model
from em_platform.simulation.cryoet.phantom import phantom_volume
from em_platform.simulation.cryoet.scene import IMPLICIT_HYDROGENS, build_scene

OPTICS = Optics(300, 2.7, 2.7, 0.8, 0.02, 0, 3.0, 0.07)  # no aperture


def test_wavelength_and_interaction_constant_match_tables():
    """simulation-and-cryo.md §2.1 (relativistic λ; σ = 2πγm₀eλ/h²)."""
    table = {100: (0.03701, 9.244e-4), 200: (0.02508, 7.288e-4), 300: (0.019687, 6.526e-4)}
    for kv, (lam, sigma) in table.items():
        assert physics.wavelength_A(kv) == pytest.approx(lam, rel=2e-4)
        assert physics.interaction_constant(kv) == pytest.approx(sigma, rel=2e-4)


def test_projected_potential_of_atoms_equals_the_gaussian_sum():
    """Three carbon atoms: structure factor × form factor equals Σ K·a_i·(4π/b_i)·exp(−4π²r²/b_i) in V·Å.

    The model has no explicit hydrogens, so each carbon carries its implicit bonded H (1.3 per C). A wide B
    keeps the atoms' spectra inside the band, where the sampled Gaussians and the band-limited projection are
    the same function (test_atom_potentials.py checks narrow atoms against a direct Fourier sum).
    """
    b_extra = 120.0
    xyz = np.array([[0.0, 0.0, 0.0], [3.3, -1.7, 5.0], [-4.1, 2.6, -3.0]], np.float32)
    model = ParticleModel("c3", "-", ("C",), np.zeros(3, np.int16), xyz, None, 10.0, 1.0, b_extra)
    sample = Sample((32.0, 32.0, 30.0), [PlacedParticle(0, "c3", np.zeros(3), np.eye(3))], [])
    scene = build_scene(sample, {"c3": model}, in_ice=False)
    grid = Grid(64, 64, 8, 0.5)
    imager = TiltImager(scene, grid, OPTICS, Ice("none", 300.0, math.inf), 1e4)
    pots, _ = imager.slab_potentials(TiltGeometry(0, 0, (0, 0), 1e4, 1e4, 0, 0), np.random.default_rng(0))
    v = grid.crop(sum(pots))
    h = IMPLICIT_HYDROGENS["C"]
    gaussians = [(a, b, 1.0) for a, b in zip(*physics.form_factor_coefficients("C"), strict=True)]
    gaussians += [(a, b, h) for a, b in zip(*physics.form_factor_coefficients("H"), strict=True)]
    yy, xx = (np.mgrid[0:64, 0:64] - 32) * 0.5
    ref = np.zeros((64, 64))
    for x, y, _ in xyz:
        r2 = (xx - x) ** 2 + (yy - y) ** 2
        for ai, bi, n in gaussians:
            bt = bi + b_extra
            ref += n * physics.POTENTIAL_CONSTANT * ai * 4 * math.pi / bt * np.exp(-4 * math.pi**2 * r2 / bt)
    assert np.abs(v - ref).max() < 0.005 * ref.max()
    # the integral is Σ f_e(0)·K: the potential's normalisation
    f0 = sum(n * a for a, _, n in gaussians)
    assert v.sum() * 0.25 == pytest.approx(3 * physics.POTENTIAL_CONSTANT * f0, rel=1e-3)


def test_the_imager_travels_to_a_dask_worker_and_images_the_same():
    """A simulation on a Dask cluster (compose's workers) scatters its imager: it must pickle (its per-thread
    NUFFT plans stay behind) and image the same tilt after the round trip, plans made anew on arrival."""
    import pickle

    xyz = np.array([[0.0, 0.0, 0.0], [3.3, -1.7, 5.0]], np.float32)
    model = ParticleModel("c2", "-", ("C",), np.zeros(2, np.int16), xyz, None, 10.0, 1.0, 40.0)
    sample = Sample((32.0, 32.0, 30.0), [PlacedParticle(0, "c2", np.zeros(3), np.eye(3))], [])
    imager = TiltImager(
        build_scene(sample, {"c2": model}, in_ice=False),
        Grid(64, 64, 8, 0.5),
        OPTICS,
        Ice("none", 300.0, math.inf),
        1e4,
    )
    geo = TiltGeometry(20, 0, (0, 0), 1e4, 1e4, 0, 0)
    before = sum(imager.slab_potentials(geo, np.random.default_rng(0))[0])  # a plan is made and cached
    travelled = pickle.loads(pickle.dumps(imager))
    after = sum(travelled.slab_potentials(geo, np.random.default_rng(0))[0])
    np.testing.assert_array_equal(after, before)


def _chain_model(tmp_path) -> ParticleModel:
    """One ferritin chain (asymmetric, unlike the 24-mer)."""
    st = gemmi.read_structure(str(Path(simulation.__file__).parent / "data" / "6z6u.pdb.gz"))
    for name in [ch.name for ch in st[0]][1:]:
        st[0].remove_chain(name)
    path = tmp_path / "chain.pdb"
    st.write_pdb(str(path))
    return load_atomic_model(path, "chain", b_factor=20.0)


def _projection(
    model: ParticleModel, rotation: np.ndarray, angle_deg: float, rot_deg: float = 0.0
) -> np.ndarray:
    sample = Sample((128.0, 128.0, 100.0), [PlacedParticle(0, model.name, np.zeros(3), rotation)], [])
    scene = build_scene(sample, {model.name: model}, in_ice=False)
    grid = Grid(96, 96, 16, 1.5)
    imager = TiltImager(scene, grid, OPTICS, Ice("none", 300.0, math.inf), 1e4)
    geo = TiltGeometry(angle_deg, rot_deg, (0, 0), 1e4, 1e4, 0, 0)
    return grid.crop(sum(imager.slab_potentials(geo, np.random.default_rng(0))[0]))


def _rz(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _ry(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def test_projection_of_a_rotated_particle_is_the_rotated_projection(tmp_path):
    model = _chain_model(tmp_path)
    plain = _projection(model, np.eye(3), 0.0)
    turned = _projection(model, _rz(37.0), 0.0)
    # rotating the image content by +37° counter-clockwise in (x, y) = (column, row), about pixel (48, 48)
    c, s = math.cos(math.radians(37.0)), math.sin(math.radians(37.0))
    inv = np.array([[c, -s], [s, c]])  # output → input: R(−37°) on (x, y), written in (row, col) order
    centre = np.array([48.0, 48.0])
    rotated = ndimage.affine_transform(plain, inv, offset=centre - inv @ centre, order=3)
    corr = np.corrcoef(turned.ravel(), rotated.ravel())[0, 1]
    assert corr > 0.99
    # the same rotation expressed as the tilt axis angle rotates the image the same way
    assert np.corrcoef(_projection(model, np.eye(3), 0.0, 37.0).ravel(), rotated.ravel())[0, 1] > 0.99
    # a particle turned by R_y(25°) seen at 0° = the unturned particle seen at tilt 25°
    np.testing.assert_allclose(
        _projection(model, _ry(25.0), 0.0), _projection(model, np.eye(3), 25.0), atol=1e-3
    )


def _radial_minima(image: np.ndarray, pixel: float, predicted: np.ndarray) -> np.ndarray:
    n = image.shape[0]
    power = np.abs(np.fft.fftshift(np.fft.fft2(image - image.mean()))) ** 2
    yy, xx = np.mgrid[0:n, 0:n] - n // 2
    r = np.hypot(yy, xx)
    ring = np.rint(r).astype(int)
    profile = np.bincount(ring.ravel(), power.ravel()) / np.maximum(np.bincount(ring.ravel()), 1)
    profile = ndimage.uniform_filter1d(profile, 3)
    q = np.arange(len(profile)) / (n * pixel)
    found = []
    for i, q0 in enumerate(predicted):
        half = 0.4 * min(
            q0 - (predicted[i - 1] if i else 0), (predicted[i + 1] - q0) if i + 1 < len(predicted) else q0
        )
        idx = np.flatnonzero((q > q0 - half) & (q < q0 + half))
        k = idx[np.argmin(profile[idx])]
        y0, y1, y2 = profile[k - 1 : k + 2]
        frac = 0.5 * (y0 - y2) / (y0 - 2 * y1 + y2) if (y0 - 2 * y1 + y2) > 0 else 0.0
        found.append((k + frac) / (n * pixel))
    return np.array(found)


def _ctf_zeros(defocus: float, count: int) -> np.ndarray:
    """sin(χ + arcsin A) = 0 with χ = πλΔf q² − ½πCsλ³q⁴: solved for q² (independent of the code)."""
    lam, cs, a = physics.wavelength_A(300), 2.7e7, 0.07
    out = []
    for k in range(1, count + 1):
        c2, c1, c0 = -0.5 * math.pi * cs * lam**3, math.pi * lam * defocus, math.asin(a) - k * math.pi
        u = (-c1 + math.sqrt(c1 * c1 - 4 * c2 * c0)) / (2 * c2)
        out.append(math.sqrt(u))
    return np.array(out)


@pytest.mark.parametrize("defocus_um", [1.2, 2.5])
def test_thon_ring_zeros_of_amorphous_ice_follow_the_ctf(defocus_um):
    """Ice only, 0°: the power spectrum's minima sit at the CTF zeros (within 1 %)."""
    sample = Sample((1024.0, 1024.0, 300.0), [], [])
    scene = build_scene(sample, {}, in_ice=True)
    grid = Grid(512, 512, 16, 2.0)
    imager = TiltImager(scene, grid, OPTICS, Ice("water", 300.0, 3150.0), 1e4)
    df = defocus_um * 1e4
    images = [
        grid.crop(imager.intensity(TiltGeometry(0, 0, (0, 0), df, df, 0, 0), np.random.default_rng(seed)))
        for seed in (1, 2)
    ]
    zeros = _ctf_zeros(df, 12)
    zeros = zeros[(zeros > 0.03) & (zeros < 0.2)]
    assert len(zeros) >= 4
    found = np.mean([_radial_minima(im, 2.0, zeros) for im in images], axis=0)
    np.testing.assert_array_less(np.abs(found - zeros) / zeros, 0.01)


def test_counts_mean_is_dose_times_pixel_area_and_variance_mean_over_dqe():
    dose, pixel, gain, dqe = 8.0, 2.0, 2.5, 0.5
    det = Detector(dqe=dqe, gain=gain, mtf_a=0, mtf_b=0, mtf_c=1, mtf_alpha=0, mtf_beta=0)
    sample = Sample((512.0, 512.0, 300.0), [], [])
    imager = TiltImager(
        build_scene(sample, {}, in_ice=False),
        Grid(256, 256, 8, pixel),
        OPTICS,
        Ice("none", 300, math.inf),
        1e4,
    )
    intensity = imager.grid.crop(
        imager.intensity(TiltGeometry(0, 0, (0, 0), 2e4, 2e4, 0, 0), np.random.default_rng(0))
    )
    expected = intensity * dose * pixel**2
    noisy, noiseless = micrographs(expected, det, np.random.default_rng(7))
    mean = dose * pixel**2 * gain
    n = noisy.size
    np.testing.assert_allclose(noiseless, mean, rtol=1e-4)
    assert abs(noisy.mean() - mean) < 4 * math.sqrt(mean * gain / dqe / n)
    var = mean * gain / dqe
    assert noisy.var() == pytest.approx(var, rel=4 * math.sqrt(2 / n) + 0.01)


def test_mtf_shapes_the_noise_power_spectrum():
    """TEM-Simulator's order: the MTF filters the noise, so its power spectrum ∝ MTF²."""
    det = Detector(dqe=1.0, gain=1.0, mtf_a=0.7, mtf_b=0.2, mtf_c=0.1, mtf_alpha=10, mtf_beta=40)
    nps = np.zeros((256, 129))
    for seed in range(4):
        noisy, _ = micrographs(np.full((256, 256), 50.0, np.float32), det, np.random.default_rng(seed))
        nps += np.abs(np.fft.rfft2(noisy - noisy.mean())) ** 2
    fy = np.fft.fftfreq(256)[:, None]
    fx = np.fft.rfftfreq(256)[None, :]
    f = np.hypot(fy, fx)
    mtf = (0.1 + 0.7 / (1 + 10 * f**2) + 0.2 / (1 + 40 * f**2)) / 1.0
    for lo, hi in ((0.05, 0.1), (0.2, 0.25), (0.4, 0.45)):
        band = (f > lo) & (f < hi)
        ratio = nps[band].mean() / (mtf[band] ** 2).mean()
        assert ratio == pytest.approx(4 * 50.0 * 256 * 256, rel=0.05)


def test_phantom_volume_projects_to_the_projected_potential(tmp_path):
    """The 3-D phantom (V) summed along z equals the 2-D projected potential (V·Å) of the same particle."""
    model = _chain_model(tmp_path)
    sample = Sample(
        (96.0, 96.0, 90.0), [PlacedParticle(0, model.name, np.zeros(3), _rz(20.0) @ _ry(40.0))], []
    )
    scene = build_scene(sample, {model.name: model}, in_ice=False)
    volume = phantom_volume(scene, (64, 64, 64), 1.5, in_ice=False)
    grid = Grid(64, 64, 16, 1.5)
    imager = TiltImager(scene, grid, OPTICS, Ice("none", 300.0, math.inf), 1e4)
    projected = grid.crop(
        sum(imager.slab_potentials(TiltGeometry(0, 0, (0, 0), 1e4, 1e4, 0, 0), np.random.default_rng(0))[0])
    )
    summed = volume.sum(axis=0) * 1.5
    assert summed.sum() == pytest.approx(projected.sum(), rel=1e-3)
    assert np.corrcoef(summed.ravel(), projected.ravel())[0, 1] > 0.995


@pytest.mark.parametrize("pixel_A", [1.0, 1.5, 2.0])
def test_partial_coherence_keeps_every_electron(pixel_A):
    """60 nm of ice at 0° with the spec's default partial coherence (0.05 mrad) and energy spread (1.3 eV,
    Cc 2.7 mm): the mean intensity is the zero-loss fraction within 0.2 % at every pixel size (with the
    envelopes taking their share off the wave it was 2.0 % low at 1.5 Å/px, 4.8 % at 1). The default 50-µm
    aperture (0.42 Å⁻¹) stops nothing below Nyquist at 1.5 and 2 Å/px; at 1 Å/px it stops the ice's wide-angle
    scattering, a real loss (README)."""
    apertures = (0.0, 50.0) if pixel_A >= 1.2 else (0.0,)
    ice = Ice("water", 600.0, 3150.0)
    sample = Sample((256 * pixel_A, 256 * pixel_A, 600.0), [], [])
    geometry = TiltGeometry(0, 0, (0, 0), 2.5e4, 2.5e4, 0, 0)
    for aperture in apertures:
        optics = Optics(300, 2.7, 2.7, 1.3, 0.05, aperture, 3.0, 0.07)
        imager = TiltImager(
            build_scene(sample, {}, in_ice=True), Grid(256, 256, 16, pixel_A), optics, ice, 150.0
        )
        means = [imager.intensity(geometry, np.random.default_rng(seed)).mean() for seed in (1, 2)]
        assert np.mean(means) == pytest.approx(math.exp(-600.0 / 3150.0), rel=0.002), aperture
