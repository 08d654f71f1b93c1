"""Loading the code location (each code server, run process and CLI call does) leaves the compute libraries
unimported until an asset uses them; a module imported on first use is whole in every thread."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

from em_platform.lazy_import import LazyModule

COMPUTE = (
    "scipy", "scipy.ndimage", "scipy.fft", "scipy.sparse", "scipy.optimize", "scipy.spatial", "dask.array",
    "cv2", "gemmi", "finufft", "PIL.Image", "tifffile", "mrcfile", "imagecodecs", "zarr", "numcodecs",
)  # fmt: skip


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_loading_the_code_location_imports_no_compute_library():
    code = f"import sys, json; import em_platform.definitions; print(json.dumps([m for m in {COMPUTE!r} if m in sys.modules]))"
    assert json.loads(_python(code)) == []


def test_a_module_first_used_by_eight_threads_at_once_is_whole_in_each():
    code = (
        "import threading\n"
        "from em_platform.lazy_import import LazyModule\n"
        "ndimage = LazyModule('scipy.ndimage')\n"
        "got = []\n"
        "def touch():\n"
        "    try:\n"
        "        got.append(ndimage.gaussian_filter.__name__)\n"
        "    except Exception as exc:\n"
        "        got.append(repr(exc))\n"
        "threads = [threading.Thread(target=touch) for _ in range(8)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print(sorted(set(got)))\n"
    )
    assert _python(code).strip() == "['gaussian_filter']"


def test_it_pickles_as_its_name_and_says_what_it_stands_for():
    lazy = LazyModule("json")
    again = pickle.loads(pickle.dumps(lazy))
    assert again.dumps([1]) == json.dumps([1]) and "'json'" in repr(again)


def test_the_em_platform_command_imports_neither_the_broker_messages_nor_sqlalchemy_to_start():
    """`em-platform settings` opens every docs block; TEM_comms (pigeon reads every installed package's
    metadata) and SQLAlchemy are imported by the commands that use them."""
    code = (
        "import contextlib, io, json, sys\n"
        "from em_platform import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    cli.main(['settings'])\n"
        "print(json.dumps([m for m in ('TEM_comms', 'pigeon', 'sqlalchemy', 'dagster') if m in sys.modules]))\n"
    )
    assert json.loads(_python(code)) == []
