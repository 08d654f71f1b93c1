"""Gold beads are erased before a CTF fit (em_platform.cryo.ctf_outliers); plain specimen noise is not."""

from __future__ import annotations

import numpy as np

from em_platform.cryo.ctf_outliers import erase_gold


def test_beads_are_erased_and_plain_noise_is_left_alone():
    rng = np.random.default_rng(0)
    image = rng.poisson(48.0, (1024, 1024)).astype(np.float32)  # 3 e/Å² at 4 Å/px
    assert erase_gold(image, 4.0)[1] == 0.0
    yy, xx = np.mgrid[0:1024, 0:1024]
    beads = [(200, 300), (700, 650), (512, 900)]
    with_beads = image.copy()
    for y, x in beads:  # 10 nm beads: 12.5 px radius, a third of the electrons through
        with_beads[(yy - y) ** 2 + (xx - x) ** 2 < 12.5**2] *= 0.35
    erased, fraction = erase_gold(with_beads, 4.0)
    assert 0.005 < fraction < 0.05
    for y, x in beads:
        assert abs(erased[y - 5 : y + 5, x - 5 : x + 5].mean() - image.mean()) < 1.0
    far = (slice(0, 100), slice(0, 100))
    assert np.array_equal(erased[far], with_beads[far])  # untouched away from the beads
