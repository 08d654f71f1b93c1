"""Closed forms of TEM image formation: wavelength, interaction constant, form factors, CTF, MTF.

Units: Å for lengths, V for potentials, kV for the accelerating voltage, rad for angles, Å⁻¹ for
spatial frequencies. Defocus is positive for underfocus. The image wave is the exit wave times
exp(+iχ) with χ(q) = πλΔf q² − ½πC_sλ³q⁴ (Kirkland's transfer function with his sign of χ), so a weak
phase object images with the familiar −2(sin χ + f_amp cos χ) contrast: protein is dark in underfocus.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from em_platform.lazy_import import LazyModule

gemmi = LazyModule("gemmi")

# CODATA 2018
PLANCK = 6.62607015e-34  # J s
ELECTRON_MASS = 9.1093837015e-31  # kg
ELEMENTARY_CHARGE = 1.602176634e-19  # C
LIGHT_SPEED = 299792458.0  # m/s
REST_ENERGY_EV = ELECTRON_MASS * LIGHT_SPEED**2 / ELEMENTARY_CHARGE  # 510998.95 eV

# h²/(2π m₀ e) in V·Å²: projected potential (V·Å) = this × Σ f_e (Å) / area (Å²)
POTENTIAL_CONSTANT = PLANCK**2 / (2 * math.pi * ELECTRON_MASS * ELEMENTARY_CHARGE) * 1e20

WATER_DENSITY_PER_A3 = 0.0334  # molecules/Å³ (amorphous ice, 0.94 g/cm³ ≈ 31.4; liquid 33.4)
GOLD_ATOMS_PER_A3 = 0.0590  # fcc gold, 19.3 g/cm³


def wavelength_A(voltage_kV: float) -> float:
    """Relativistic electron wavelength λ = h / √(2m₀eV(1 + eV/2m₀c²)) in Å."""
    v = voltage_kV * 1e3
    p = math.sqrt(2 * ELECTRON_MASS * ELEMENTARY_CHARGE * v * (1 + v / (2 * REST_ENERGY_EV)))
    return PLANCK / p * 1e10


def interaction_constant(voltage_kV: float) -> float:
    """σ = 2πγm₀eλ/h² in rad/(V·Å): the phase shift is σ ∫V dz."""
    gamma = 1 + voltage_kV * 1e3 / REST_ENERGY_EV
    lam_m = wavelength_A(voltage_kV) * 1e-10
    return 2 * math.pi * gamma * ELECTRON_MASS * ELEMENTARY_CHARGE * lam_m / PLANCK**2 * 1e-10


@functools.cache
def form_factor_coefficients(element: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(a_i, b_i) of the 5-Gaussian electron scattering factor (International Tables 4.3.2.2, via gemmi).

    f_e(s) = Σ a_i exp(−b_i s²) in Å, with s = sin θ/λ = q/2.
    """
    el = gemmi.Element(element)
    if el.atomic_number == 0:
        raise ValueError(f"unknown chemical element {element!r}")
    c = el.c4322
    return tuple(float(a) for a in c.a), tuple(float(b) for b in c.b)


def form_factor(element: str, q2: np.ndarray, b_factor: float = 0.0) -> np.ndarray:
    """f_e(q) in Å at squared spatial frequency q² (Å⁻²), with an isotropic B-factor (Å²)."""
    a, b = form_factor_coefficients(element)
    out = np.zeros_like(q2, dtype=np.result_type(q2, np.float32))
    for ai, bi in zip(a, b, strict=True):
        out += ai * np.exp(-(bi + b_factor) * q2 / 4.0)
    return out


def water_form_factor(q2: np.ndarray) -> np.ndarray:
    """One water molecule as O + 2 H (isolated atoms; bonding is ignored)."""
    return form_factor("O", q2) + 2.0 * form_factor("H", q2)


WATER_S0 = 0.06  # structure factor of water at q → 0 (its isothermal compressibility, ~25 °C)
WATER_SQ_WIDTH = 0.15  # Å⁻¹: S(q) rises to 1 over the flank of the first diffraction peak (~0.3 Å⁻¹)


def water_structure_factor(q2: np.ndarray) -> np.ndarray:
    """An approximate S(q) of amorphous water: S0 at low q (incompressible liquid), 1 past the first peak.

    S(q) = S0 + (1 − S0)·(1 − exp(−q²/2w²)). The peak's overshoot is left out; an ideal gas of molecules
    (S = 1) would overstate the low-frequency ice noise about 15-fold.
    """
    return WATER_S0 + (1.0 - WATER_S0) * (1.0 - np.exp(-q2 / (2 * WATER_SQ_WIDTH**2)))


def mean_inner_potential(density_per_A3: float, f0_A: float) -> float:
    """Mean potential (V) of a medium of ``density`` scatterers with forward scattering factor ``f0``."""
    return POTENTIAL_CONSTANT * density_per_A3 * f0_A


def amplitude_contrast_ratio(amplitude_contrast: float) -> float:
    """f_amp = V_im / V that gives the CTF amplitude contrast A: A = f_amp / √(1 + f_amp²)."""
    return amplitude_contrast / math.sqrt(1.0 - amplitude_contrast**2)


def frequency_grid(shape: tuple[int, int], pixel_A: float) -> tuple[np.ndarray, np.ndarray]:
    """(qy, qx) in Å⁻¹ for a full complex FFT of ``shape``, broadcastable (ny, 1) and (1, nx)."""
    qy = np.fft.fftfreq(shape[0], d=pixel_A)[:, None]
    qx = np.fft.fftfreq(shape[1], d=pixel_A)[None, :]
    return qy, qx


def rfrequency_grid(shape: tuple[int, int], pixel_A: float) -> tuple[np.ndarray, np.ndarray]:
    """(qy, qx) for a real FFT (rfft2) of ``shape``."""
    qy = np.fft.fftfreq(shape[0], d=pixel_A)[:, None]
    qx = np.fft.rfftfreq(shape[1], d=pixel_A)[None, :]
    return qy, qx


def astigmatic_defocus(
    qy: np.ndarray, qx: np.ndarray, defocus_u: float, defocus_v: float, astigmatism_angle_deg: float
) -> np.ndarray:
    """Δf(φ) = ½(Δf_u + Δf_v) + ½(Δf_u − Δf_v)·cos 2(φ − φ_ast), φ the frequency's azimuth (CTFFIND)."""
    phi = np.arctan2(qy, qx)
    ast = math.radians(astigmatism_angle_deg)
    return 0.5 * (defocus_u + defocus_v) + 0.5 * (defocus_u - defocus_v) * np.cos(2 * (phi - ast))


def coherence_envelope(
    q2: np.ndarray,
    *,
    wavelength: float,
    defocus: float,
    cs_mm: float,
    cc_mm: float,
    energy_spread_eV: float,
    voltage_kV: float,
    illumination_angle_mrad: float,
) -> np.ndarray:
    """Spatial × temporal partial-coherence envelope (applied to the wave, as TEM-Simulator does).

    E_s = exp[−(πα/λ)²(Δfλq − C_sλ³q³)²] for an illumination semi-angle α; E_t = exp[−½(πλδ)²q⁴] with
    the focal spread δ = C_c·(ΔE/E)·(1 + 2εE)/(1 + εE) / (2√(2 ln 2)) for a FWHM energy spread ΔE.
    """
    q = np.sqrt(q2)
    cs = cs_mm * 1e7
    alpha = illumination_angle_mrad * 1e-3
    spatial = np.exp(
        -((np.pi * alpha / wavelength) ** 2) * (defocus * wavelength * q - cs * wavelength**3 * q**3) ** 2
    )
    e_v = voltage_kV * 1e3
    eps = 1.0 / (2 * REST_ENERGY_EV)
    rel = (1 + 2 * eps * e_v) / (1 + eps * e_v)
    spread = cc_mm * 1e7 * (energy_spread_eV / e_v) * rel / (2 * math.sqrt(2 * math.log(2)))
    temporal = np.exp(-0.5 * (np.pi * wavelength * spread) ** 2 * q2**2)
    return spatial * temporal


def aperture_cutoff_A(aperture_um: float, focal_length_mm: float, wavelength: float) -> float:
    """Highest spatial frequency (Å⁻¹) the objective aperture passes: (d/2)/f / λ."""
    if aperture_um <= 0:
        return math.inf
    return (aperture_um * 1e-6 / 2) / (focal_length_mm * 1e-3) / wavelength


def fresnel_propagator(q2: np.ndarray, wavelength: float, distance: float) -> np.ndarray:
    """Free-space propagation downstream by ``distance`` Å: exp(−iπλΔz q²)."""
    return np.exp(-1j * np.pi * wavelength * distance * q2)


def mtf(f: np.ndarray, *, a: float, b: float, c: float, alpha: float, beta: float) -> np.ndarray:
    """TEM-Simulator's parametric detector MTF (p = q = 1) at f in cycles/pixel; 1 at f = 0.

    MTF(f) = [c + a/(1 + αf²) + b/(1 + βf²)] / (a + b + c).
    """
    f2 = f**2
    return (c + a / (1 + alpha * f2) + b / (1 + beta * f2)) / (a + b + c)


def damage_b_factor(accumulated_dose_e_per_A2: float, sensitivity: float) -> float:
    """Parakeet's dose-dependent isotropic B-factor: B = 8π²·S·D (Å²)."""
    return 8 * math.pi**2 * sensitivity * accumulated_dose_e_per_A2
