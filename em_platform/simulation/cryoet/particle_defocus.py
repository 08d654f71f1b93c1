"""Each particle's defocus as the image shows it: fitted against the image of its own projection as a lone
thin object, so a simulated series can be checked against its ground truth's Δf + z′ (issue 25)."""

from __future__ import annotations

import math

import numpy as np

from em_platform.simulation.cryoet import physics


class ThinObject:
    """A thin object of projected potential ``v`` (V·Å) imaged at any defocus, coherent illumination:
    ψ = IFT(FT(e^{(i − f)σv})·e^{iχ}), χ = πλΔf q² − ½πC_sλ³q⁴."""

    def __init__(self, v: np.ndarray, pixel_A: float, optics):
        lam, sigma = physics.wavelength_A(optics.voltage_kV), physics.interaction_constant(optics.voltage_kV)
        f = physics.amplitude_contrast_ratio(optics.amplitude_contrast)
        qy, qx = physics.frequency_grid(v.shape, pixel_A)
        q2 = qy**2 + qx**2
        self._focus = math.pi * lam * q2
        self._cs = -0.5 * math.pi * optics.cs_mm * 1e7 * lam**3 * q2**2
        self._exit = np.fft.fft2(np.exp((1j - f) * sigma * v))

    def contrast(self, defocus_A: float) -> np.ndarray:
        """|ψ|² − 1 at ``defocus_A``."""
        wave = np.fft.ifft2(self._exit * np.exp(1j * (defocus_A * self._focus + self._cs)))
        return np.abs(wave) ** 2 - 1


def _scan(
    target: np.ndarray, obj: ThinObject, near: np.ndarray, guess_A: float, span_A: float, step_A: float
):
    trials = np.arange(guess_A - span_A, guess_A + span_A + step_A / 2, step_A)
    misfit = []
    for d in trials:
        model = obj.contrast(d)[near]
        scale = (model @ target) / (model @ model)
        misfit.append(float(np.sum((target - scale * model) ** 2)))
    k = int(np.clip(np.argmin(misfit), 1, len(trials) - 2))
    y0, y1, y2 = misfit[k - 1 : k + 2]
    curvature = y0 - 2 * y1 + y2
    return float(trials[k] + (step_A * 0.5 * (y0 - y2) / curvature if curvature > 0 else 0.0))


def fit_defocus(
    contrast: np.ndarray,
    v: np.ndarray,
    near: np.ndarray,
    pixel_A: float,
    optics,
    guess_A: float,
    span_A: float = 300.0,
    step_A: float = 10.0,
) -> float:
    """The defocus whose thin-object image of ``v`` best fits ``contrast`` on the pixels ``near`` (least
    squares with a free scale, on a grid of ``step_A`` around ``guess_A``, refined by a parabola)."""
    return _scan(contrast[near], ThinObject(v, pixel_A, optics), near, guess_A, span_A, step_A)


def fit_defoci(
    contrast: np.ndarray,
    potentials: list[np.ndarray],
    masks: list[np.ndarray],
    pixel_A: float,
    optics,
    guess_A: float,
    span_A: float = 300.0,
    step_A: float = 10.0,
    sweeps: int = 3,
) -> list[float]:
    """Every particle's defocus in one image, each fitted with its neighbours' modelled images (at their
    current fits) taken out: their delocalised fringes reach ~λΔf·q_max (150 Å at 3 µm, 2 Å/px)."""
    objects = [ThinObject(v, pixel_A, optics) for v in potentials]
    fitted = [guess_A] * len(objects)
    models = [obj.contrast(guess_A) for obj in objects]
    total = np.sum(models, axis=0)
    for _ in range(sweeps):
        for k, (obj, near) in enumerate(zip(objects, masks, strict=True)):
            rest = (contrast - (total - models[k]))[near]
            fitted[k] = _scan(rest, obj, near, guess_A, span_A, step_A)
            new = obj.contrast(fitted[k])
            total += new - models[k]
            models[k] = new
    return fitted
