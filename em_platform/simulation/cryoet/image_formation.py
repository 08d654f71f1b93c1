"""One tilt's image intensity: projected potential per slab, amorphous ice, multislice, optics.

Per tilt θ (true angle, with the geometry errors) the specimen points are rotated R_z(φ)·R_y(θ) and
shifted; the beam runs along +z. Objects (particles, beads) are sorted into slabs along z by their
centres (``slab_A`` thick, the depth of field at Nyquist); each object's projected potential is made on
a box of its own, exact at any sub-pixel position and propagated from its own height to its slab's plane
(:mod:`object_boxes`), and added to the slab's potential V_k (V·Å). The wave crosses the slabs from
the top: ψ ← P(Δz) * (ψ · exp(iσV_k − σ f_amp V_k)) with the Fresnel propagator P. Amorphous ice is a
zero-mean Gaussian field with the statistics of water molecules (ρ·path length per pixel, each an
O + 2H form factor, correlated by the liquid's structure factor S(q)) added to
every slab it passes through, so tilted ice carries its defocus gradient. The wave is then referred to
the plane z = 0 (the tilt axis height, where the defocus is given), passed through the objective
transfer exp(iχ)·E_s·E_t·aperture, and |ψ|² is the intensity, 1 in vacuum; zero-loss filtering removes
the inelastically scattered fraction, exp(−path/λ_mfp).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from em_platform.lazy_import import LazyModule
from em_platform.simulation.cryoet import physics
from em_platform.simulation.cryoet.object_boxes import ObjectBoxes
from em_platform.simulation.cryoet.scene import Scene, water_potential_V

sfft = LazyModule("scipy.fft")


@dataclass(frozen=True)
class Optics:
    voltage_kV: float
    cs_mm: float
    cc_mm: float
    energy_spread_eV: float
    illumination_angle_mrad: float
    aperture_um: float
    focal_length_mm: float
    amplitude_contrast: float

    @property
    def wavelength(self) -> float:
        return physics.wavelength_A(self.voltage_kV)

    @property
    def sigma(self) -> float:
        return physics.interaction_constant(self.voltage_kV)


@dataclass(frozen=True)
class Ice:
    model: str  # "water" | "mean" | "none"
    thickness_A: float
    mean_free_path_A: float  # inelastic, for zero-loss filtering (inf = no attenuation)


@dataclass(frozen=True)
class TiltGeometry:
    """Where the specimen is for one exposure (the truth of one tilt)."""

    angle_deg: float  # true tilt angle
    rotation_deg: float  # tilt-axis angle + in-plane error, counter-clockwise
    shift_px: tuple[float, float]  # (dx, dy)
    defocus_u_A: float
    defocus_v_A: float
    astigmatism_angle_deg: float
    damage_b_A2: float  # dose B-factor for this exposure


@dataclass(frozen=True)
class Grid:
    """The padded simulation grid around the detector's field."""

    ny: int
    nx: int
    pad: int
    pixel_A: float

    @property
    def shape(self) -> tuple[int, int]:
        return (
            sfft.next_fast_len(self.ny + 2 * self.pad, real=True),
            sfft.next_fast_len(self.nx + 2 * self.pad, real=True),
        )

    @property
    def origin(self) -> tuple[int, int]:
        """Padded-grid index (row, column) of the image origin (ny//2, nx//2 of the detector)."""
        my, mx = self.shape
        return (my - self.ny) // 2 + self.ny // 2, (mx - self.nx) // 2 + self.nx // 2

    def crop(self, image: np.ndarray) -> np.ndarray:
        my, mx = self.shape
        y0, x0 = (my - self.ny) // 2, (mx - self.nx) // 2
        return image[y0 : y0 + self.ny, x0 : x0 + self.nx]


def tilt_matrix(angle_deg: float, rotation_deg: float) -> np.ndarray:
    """R_z(φ)·R_y(θ) acting on (x, y, z) column vectors."""
    t, r = math.radians(angle_deg), math.radians(rotation_deg)
    ry = np.array([[math.cos(t), 0, math.sin(t)], [0, 1, 0], [-math.sin(t), 0, math.cos(t)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ ry


def rotate_xy(rot: np.ndarray, coords_t: np.ndarray) -> np.ndarray:
    """The first two rows of ``rot @ coords_t`` for points (3, n), with elementwise products, not BLAS.

    A (2, 3) x (3, n) product is memory-bound; OpenBLAS would run it on its own thread pool, which spins
    while the tilts already keep every core busy (11.5 → 8.3 CPU s for a 41-tilt stack on 2 cores).
    """
    out = np.empty((2, coords_t.shape[1]), np.float32)
    tmp = np.empty(coords_t.shape[1], np.float32)
    for i in (0, 1):
        np.multiply(coords_t[0], rot[i, 0], out=out[i])
        out[i] += np.multiply(coords_t[1], rot[i, 1], out=tmp)
        out[i] += np.multiply(coords_t[2], rot[i, 2], out=tmp)
    return out


def pixel_positions(xy: np.ndarray, geometry: TiltGeometry, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Padded-grid pixel coordinates (x, y) of tilted points or centres (2, n) in Å."""
    oy, ox = grid.origin
    ix = xy[0] * np.float32(1 / grid.pixel_A) + np.float32(geometry.shift_px[0] + ox)
    iy = xy[1] * np.float32(1 / grid.pixel_A) + np.float32(geometry.shift_px[1] + oy)
    return ix, iy


def ice_path_lengths(grid: Grid, geometry: TiltGeometry, thickness_A: float, edges: np.ndarray) -> np.ndarray:
    """Path length (Å) of each pixel's ray through the ice inside each slab [edges[k], edges[k+1])."""
    my, mx = grid.shape
    oy, ox = grid.origin
    p = grid.pixel_A
    u = ((np.arange(mx) - ox - geometry.shift_px[0]) * p).astype(np.float32)
    v = ((np.arange(my) - oy - geometry.shift_px[1]) * p).astype(np.float32)
    r, t = math.radians(geometry.rotation_deg), math.radians(geometry.angle_deg)
    # undo the in-plane rotation: x' of each pixel; the ice spans z' in [lo, hi] there
    centre = (np.float32(math.cos(r)) * u[None, :] + np.float32(math.sin(r)) * v[:, None]) * np.float32(
        -math.tan(t)
    )
    half = np.float32(thickness_A / 2 / math.cos(t))
    lo, hi = centre - half, centre + half
    out = np.zeros((len(edges) - 1, my, mx), np.float32)
    z_min, z_max = float(np.min(lo)), float(np.max(hi))
    for k in range(len(edges) - 1):
        if edges[k + 1] <= z_min or edges[k] >= z_max:
            continue
        np.clip(
            np.minimum(hi, np.float32(edges[k + 1])) - np.maximum(lo, np.float32(edges[k])),
            0,
            None,
            out=out[k],
        )
    return out


def slab_edges(z_lo: float, z_hi: float, slab_A: float) -> np.ndarray:
    n = max(1, math.ceil((z_hi - z_lo) / slab_A - 1e-9))
    mid = 0.5 * (z_lo + z_hi)
    return mid + (np.arange(n + 1) - n / 2) * slab_A


def zero_loss_fraction(ice: Ice, angle_deg: float) -> float:
    """Fraction of electrons that pass the ice without inelastic scattering (path = t/cos θ)."""
    if ice.model == "none" or not math.isfinite(ice.mean_free_path_A):
        return 1.0
    return math.exp(-ice.thickness_A / math.cos(math.radians(angle_deg)) / ice.mean_free_path_A)


class TiltImager:
    """Everything about a stack's image formation that does not change from tilt to tilt.

    Built once per stack (frequency grids, every object's box and the channels' form factors on it, the
    slab propagator); :meth:`intensity` then images one tilt. Thread-safe: tilts may run in parallel.
    """

    def __init__(self, scene: Scene, grid: Grid, optics: Optics, ice: Ice, slab_A: float):
        self.scene, self.grid, self.optics, self.ice, self.slab_A = scene, grid, optics, ice, slab_A
        self.coords_t = np.ascontiguousarray(scene.coords.T, dtype=np.float32)  # (3, n): rows per axis
        my, mx = grid.shape
        p = grid.pixel_A
        solvent = water_potential_V() if ice.model != "none" else 0.0
        self.boxes = ObjectBoxes(scene, p, solvent)
        qy, qx = physics.rfrequency_grid((my, mx), p)
        rq2 = (qy**2 + qx**2).astype(np.float64)
        self.f_water = (
            physics.POTENTIAL_CONSTANT
            * physics.water_form_factor(rq2)
            * np.sqrt(physics.water_structure_factor(rq2))
        ).astype(np.float32) / np.float32(p * p)
        fy, fx = physics.frequency_grid((my, mx), p)
        self.fqy, self.fqx = fy, fx
        self.q2 = (fy**2 + fx**2).astype(np.float32)
        self.step = physics.fresnel_propagator(self.q2.astype(np.float64), optics.wavelength, slab_A).astype(
            np.complex64
        )
        q_max = physics.aperture_cutoff_A(optics.aperture_um, optics.focal_length_mm, optics.wavelength)
        self.aperture = self.q2 <= q_max**2

    # -- potential ------------------------------------------------------------------------------

    def _layout(self, geometry: TiltGeometry):
        """Tilted points and object centres in padded-grid pixels, the centres' heights, the slab edges and
        each object's slab."""
        grid, ice, scene = self.grid, self.ice, self.scene
        my, mx = grid.shape
        rot = tilt_matrix(geometry.angle_deg, geometry.rotation_deg).astype(np.float32)
        ix, iy = pixel_positions(rotate_xy(rot, self.coords_t), geometry, grid)
        cx, cy = pixel_positions((scene.centres @ rot[:2].T).T, geometry, grid)
        z = scene.centres @ rot[2]
        t = math.radians(geometry.angle_deg)
        half_diag = 0.5 * math.hypot(my, mx) * grid.pixel_A
        ice_half = (
            (ice.thickness_A / 2 + half_diag * abs(math.sin(t))) / math.cos(t)
            if ice.model == "water"
            else 0.0
        )
        z_lo = min(float(z.min()) if z.size else 0.0, -ice_half)
        z_hi = max(float(z.max()) if z.size else 0.0, ice_half)
        edges = slab_edges(z_lo - 1e-3, z_hi + 1e-3, self.slab_A)
        slab_of = np.clip(((z - edges[0]) / self.slab_A).astype(np.int64), 0, len(edges) - 2)
        return ix, iy, cx, cy, z, edges, slab_of

    def _ice(
        self, geometry: TiltGeometry, rng: np.random.Generator, edges: np.ndarray
    ) -> dict[int, np.ndarray]:
        """The amorphous ice's projected potential (V·Å) in every slab it passes through."""
        grid, ice = self.grid, self.ice
        if ice.model != "water":
            return {}
        my, mx = grid.shape
        paths = ice_path_lengths(grid, geometry, ice.thickness_A, edges)
        density = np.float32(physics.WATER_DENSITY_PER_A3 * grid.pixel_A**2)
        out = {}
        for k in range(len(edges) - 1):
            if not paths[k].any():
                continue
            field = rng.standard_normal((my, mx), dtype=np.float32)
            field *= np.sqrt(paths[k] * density)
            term = sfft.rfft2(field, overwrite_x=True)
            term *= self.f_water
            out[k] = sfft.irfft2(term, s=(my, mx), overwrite_x=True)
        return out

    def slab_potentials(
        self, geometry: TiltGeometry, rng: np.random.Generator
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """Projected potential (V·Å, padded grid) of every non-empty slab, and the slabs' centre heights:
        each object projected whole into the slab of its centre (what the projection tests compare)."""
        ix, iy, cx, cy, _, edges, slab_of = self._layout(geometry)
        slabs = self._ice(geometry, rng, edges)
        for o in range(len(self.scene.centres)):
            k = int(slab_of[o])
            if k not in slabs:
                slabs[k] = np.zeros(self.grid.shape, np.float32)
            self.boxes.add_projection(slabs[k], o, ix, iy, (float(cx[o]), float(cy[o])), geometry.damage_b_A2)
        keep = sorted(slabs)
        return [slabs[k] for k in keep], (0.5 * (edges[:-1] + edges[1:]))[keep]

    def transmission(self, potential: np.ndarray) -> np.ndarray:
        """exp(iσV − σ·f_amp·V) of a real projected potential (V·Å)."""
        sigma = np.float32(self.optics.sigma)
        famp = np.float32(physics.amplitude_contrast_ratio(self.optics.amplitude_contrast))
        phase = sigma * potential
        amplitude = np.exp(-famp * phase)
        out = np.empty(potential.shape, np.complex64)
        out.real = amplitude * np.cos(phase)
        out.imag = amplitude * np.sin(phase)
        return out

    def slab_transmissions(
        self, geometry: TiltGeometry, rng: np.random.Generator
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """Transmission function of every non-empty slab (ice, then each object's, propagated from its own
        height to the slab's plane), and the slabs' centre heights."""
        ix, iy, cx, cy, z, edges, slab_of = self._layout(geometry)
        centres = 0.5 * (edges[:-1] + edges[1:])
        slabs = {k: self.transmission(v) for k, v in self._ice(geometry, rng, edges).items()}
        wave = (
            self.optics.sigma,
            physics.amplitude_contrast_ratio(self.optics.amplitude_contrast),
            self.optics.wavelength,
        )
        for o in range(len(self.scene.centres)):
            k = int(slab_of[o])
            if k not in slabs:
                slabs[k] = np.ones(self.grid.shape, np.complex64)
            self.boxes.multiply_transmission(
                slabs[k],
                o,
                ix,
                iy,
                (float(cx[o]), float(cy[o])),
                geometry.damage_b_A2,
                wave,
                float(centres[k] - z[o]),
            )
        keep = sorted(slabs)
        return [slabs[k] for k in keep], centres[keep]

    # -- wave -----------------------------------------------------------------------------------

    def _objective(self, geometry: TiltGeometry, refer_from: float) -> tuple[np.ndarray, np.ndarray]:
        """(exp(iχ)·E_s·E_t·aperture, E_s·E_t·aperture), with the propagation from the last slab's plane to
        z = 0 folded in."""
        o = self.optics
        lam = np.float32(o.wavelength)
        q2 = self.q2
        df_mean = 0.5 * (geometry.defocus_u_A + geometry.defocus_v_A)
        df: np.ndarray | np.float32
        if geometry.defocus_u_A != geometry.defocus_v_A:
            df = physics.astigmatic_defocus(
                self.fqy, self.fqx, geometry.defocus_u_A, geometry.defocus_v_A, geometry.astigmatism_angle_deg
            ).astype(np.float32)
        else:
            df = np.float32(df_mean)
        cs = np.float32(o.cs_mm * 1e7)
        chi = (
            np.float32(np.pi) * lam * (df + np.float32(refer_from)) * q2
            - np.float32(0.5 * np.pi) * cs * lam**3 * q2 * q2
        )
        env = physics.coherence_envelope(
            q2,
            wavelength=o.wavelength,
            defocus=df_mean,
            cs_mm=o.cs_mm,
            cc_mm=o.cc_mm,
            energy_spread_eV=o.energy_spread_eV,
            voltage_kV=o.voltage_kV,
            illumination_angle_mrad=o.illumination_angle_mrad,
        ).astype(np.float32, copy=False)
        env *= self.aperture
        out = np.empty(q2.shape, np.complex64)
        out.real = env * np.cos(chi)
        out.imag = env * np.sin(chi)
        return out, env

    def exit_wave_intensity(
        self, transmissions: list[np.ndarray], heights: np.ndarray, geometry: TiltGeometry
    ) -> np.ndarray:
        """|ψ|² at the detector (padded grid), vacuum = 1, after multislice and the objective lens."""
        my, mx = self.grid.shape
        if not transmissions:
            return np.ones((my, mx), np.float32)
        spectrum = None
        for k, trans in enumerate(transmissions):
            if spectrum is not None:
                trans = trans * sfft.ifft2(spectrum, overwrite_x=True)
            spectrum = sfft.fft2(trans, overwrite_x=spectrum is not None)
            if k + 1 < len(transmissions):
                gap = round((heights[k + 1] - heights[k]) / self.slab_A)
                for _ in range(gap):
                    spectrum *= self.step
        assert spectrum is not None  # one transmission at least
        transfer, envelope = self._objective(geometry, float(heights[-1]))
        # Partial coherence is an incoherent sum over defoci and beam directions, each conserving the
        # electrons; as an envelope on the wave it removes |Ψ(q)|²·(1 − E²) of them (2–5 % in ice at
        # 1–1.5 Å/px). That intensity lands as a smooth background: given back here, uniformly. What the
        # aperture stops stays lost.
        power = spectrum.real**2 + spectrum.imag**2
        envelope *= envelope
        np.subtract(self.aperture, envelope, out=envelope)
        scattered_away = float(np.vdot(power.ravel(), envelope.ravel())) / power.size**2
        spectrum *= transfer
        image = sfft.ifft2(spectrum, overwrite_x=True)
        intensity = image.real**2 + image.imag**2
        intensity += np.float32(scattered_away)
        return intensity.astype(np.float32, copy=False)

    def intensity(self, geometry: TiltGeometry, rng: np.random.Generator) -> np.ndarray:
        """The noiseless intensity of one tilt on the padded grid (vacuum = 1 before zero-loss filtering)."""
        transmissions, heights = self.slab_transmissions(geometry, rng)
        intensity = self.exit_wave_intensity(transmissions, heights, geometry)
        return intensity * np.float32(zero_loss_fraction(self.ice, geometry.angle_deg))
