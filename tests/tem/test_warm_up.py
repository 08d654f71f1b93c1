"""warm_up compiles every kernel the tile chain reaches: a live-QC service or a montage run warms its workers
before the first tile is due, and a kernel left out is compiled on the first tile instead (1.5-2.4 s on a
fresh install, or in every new container, whose image holds only the kernels compiled when it was built)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def test_after_warm_up_a_real_tile_compiles_nothing(tmp_path):
    # a process of its own with an empty numba cache: what a fresh install or a new container starts with
    script = textwrap.dedent(
        """
        import json, sys
        import numba
        import numpy as np
        from em_platform.tem import byte_counts, clahe_avx2, clahe_u8, tile_tasks
        from em_platform.tem.tile_processing import Flatfield

        def compiled():
            return {
                f"{m.__name__}.{name}": len(f.signatures)
                for m in (byte_counts, clahe_avx2, clahe_u8)
                for name, f in vars(m).items()
                if isinstance(f, numba.core.registry.CPUDispatcher)
            }

        tile_tasks.warm_up()
        warmed = compiled()
        rng = np.random.default_rng(1)
        for dtype, side in ((np.uint8, 2000), (np.uint16, 1031)):
            raw = rng.integers(20, 200, (side, side)).astype(dtype)
            flatfield = Flatfield.from_frames([np.full(raw.shape, 180, dtype)], [np.full(raw.shape, 5, dtype)])
            for correction in (None, flatfield):
                outcome = tile_tasks._process_image(raw, correction, side // 10, {})
                assert outcome.error is None, outcome.error
        print(json.dumps({"warmed": warmed, "after": compiled()}))
        """
    )
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "numba"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert any(counts["warmed"].values()), counts["warmed"]  # (callees and the other CPU's path stay at 0)
    grew = {k: (n, counts["after"][k]) for k, n in counts["warmed"].items() if counts["after"][k] != n}
    assert not grew, f"kernels compiled on the first tile, not by warm_up (signatures before, after): {grew}"
