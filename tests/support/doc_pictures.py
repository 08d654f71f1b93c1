"""The README's and docs' pictures, made by the browser tests from the UI they test, and kept in step with it.

Each picture in ``docs/img`` has a sidecar ``<name>.json`` listing what the page it shows holds (the metadata
rows of the montage's partition, the layers and layout of a Neuroglancer view). A browser test that opens
that page hands its fresh screenshot and the page's current contents to :func:`keep_doc_picture`: with
``EM_UPDATE_DOC_PICTURES=1`` the picture and its sidecar are replaced; otherwise the test fails when the page
holds something the committed picture does not (or no longer holds what it does), naming the difference and
the command that makes the picture anew.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tests.support.browser import REPO

DOC_IMAGES = REPO / "docs" / "img"
UPDATE = "EM_UPDATE_DOC_PICTURES"


def keep_doc_picture(name: str, screenshot: Path, shows: list[str]) -> None:
    """``docs/img/<name>.png`` is ``screenshot`` of a page holding ``shows`` (see the module docstring)."""
    picture, sidecar = DOC_IMAGES / f"{name}.png", DOC_IMAGES / f"{name}.json"
    if os.environ.get(UPDATE) == "1":
        shutil.copyfile(screenshot, picture)
        sidecar.write_text(json.dumps({"shows": shows}, indent=1) + "\n")
        print(f"{picture} made anew from {screenshot}")
        return
    assert picture.is_file() and sidecar.is_file(), f"{picture} or {sidecar} is missing"
    pictured = json.loads(sidecar.read_text())["shows"]
    added = [s for s in shows if s not in pictured]
    gone = [s for s in pictured if s not in shows]
    assert not added and not gone, (
        f"{picture.relative_to(REPO)} is older than the page it shows: the page now has {added or 'nothing more'}"
        f" and no longer {gone or 'lacks anything'}. Make the pictures anew from the browser tests' screenshots: "
        f"{UPDATE}=1 .venv/bin/python -m pytest tests/browser"
    )
