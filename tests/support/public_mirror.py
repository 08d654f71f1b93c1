"""Loopback mirrors of the public sources, holding small real-format datasets under the real partition keys,
and the environment that points em_platform at them (EM_<SOURCE>_<FIELD>), so the README's ingest commands run
offline exactly as written:

    with PublicMirror(tmp_path) as mirror:
        subprocess.run([... "dagster", "asset", "materialize", "-m", "em_platform.definitions",
                        "--select", "ingest/empiar", "--partition", "11759"], env={**os.environ, **mirror.env})

EMPIAR 11759 (four DM3 sections; REST API, FTP archive and its HTTPS mirror with an index page), IDR
idr0086-9846137 (an OME-TIFF over FTP and HTTPS, IDR JSON API), EPFL hippocampus-ca1 (a multi-page TIFF over
HTTP with Range) and the FlyEM crops (a DVID holding both). OpenOrganelle needs an S3 endpoint: set
EM_OPENORGANELLE_ENDPOINT_URL to one (the tests' moto server) holding the container.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from em_platform.formats.dm_writer import write_dm
from em_platform.samples import em_texture, write_ome_tiff
from em_platform.sources import flyem, idr
from tests.support.dvid_server import DvidServer
from tests.support.ftp_files import FtpFileServer
from tests.support.http_files import HttpFileServer, apache_index
from tests.support.public_apis import empiar_entry, idr_image

EMPIAR_DATA = "empiar/world_availability/11759/data"


class PublicMirror:
    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "http").mkdir(parents=True, exist_ok=True)
        (self.root / "ftp").mkdir(parents=True, exist_ok=True)
        self.http = HttpFileServer(self.root / "http")
        self.ftp = FtpFileServer(self.root / "ftp")
        crops = list(flyem.DATASETS.values())
        lo = tuple(min(c.offset_zyx[i] for c in crops) - 64 for i in range(3))
        hi = tuple(max(c.offset_zyx[i] + c.size_zyx[i] for c in crops) + 64 for i in range(3))
        self.dvid = DvidServer(min_zyx=lo, shape_zyx=tuple(h - low for h, low in zip(hi, lo, strict=True)))
        self.env: dict[str, str] = {}

    def __enter__(self) -> PublicMirror:
        self.http.__enter__()
        self.ftp.__enter__()
        self.dvid.__enter__()
        self._empiar()
        self._idr()
        self._epfl()
        self.env |= {
            "EM_FLYEM_DVID_SERVER": self.dvid.url,
            "NO_PROXY": "127.0.0.1,localhost",
        }
        return self

    def __exit__(self, *exc) -> None:
        self.dvid.__exit__(*exc)
        self.ftp.__exit__(*exc)
        self.http.__exit__(*exc)

    def _empiar(self) -> None:
        sections = em_texture((4, 96, 112), seed=16, dtype=np.uint16)
        names = [f"retina_s{i + 1}.dm3" for i in range(len(sections))]
        for base in (self.ftp.root, self.http.root):
            (base / EMPIAR_DATA).mkdir(parents=True, exist_ok=True)
            for name, section in zip(names, sections, strict=True):
                write_dm(base / EMPIAR_DATA / name, section, version=3, scale=(8.0, 8.0), units=("nm", "nm"))
        listing = [(n, (self.http.root / EMPIAR_DATA / n).stat().st_size) for n in names]
        self.http.add_html(f"/{EMPIAR_DATA}/", apache_index(listing))
        self.http.add_json(
            "/empiar/api/entry/11759/",
            empiar_entry(
                "11759",
                title="Developing retina in zebrafish 55 hpf larval eye",
                experiment_type="SBF-SEM",
                directory="data",
                data_format="DM3",
                slices=len(names),
                shape_yx=sections.shape[1:],
                pixel_nm=8.0,
            ),
        )
        self.env |= {
            "EM_EMPIAR_API_URL": self.http.url + "/empiar/api/entry/{entry_id}/",
            "EM_EMPIAR_ARCHIVE_FTP": self.ftp.url + "/empiar/world_availability/{entry_id}/data/",
            "EM_EMPIAR_ARCHIVE_HTTPS": self.http.url + "/empiar/world_availability/{entry_id}/data/",
        }

    def _idr(self) -> None:
        image = idr.DATASETS["idr0086-9846137"]
        volume = em_texture((6, 80, 96), seed=17, dtype=np.uint8)
        for base in (self.ftp.root, self.http.root):
            path = base / "IDR" / image.archive_folder / image.file_name
            path.parent.mkdir(parents=True, exist_ok=True)
            write_ome_tiff(path, volume, {"z": 20.0, "y": 20.0, "x": 20.0})
        self.http.add_json("/api/v0/m/images/9846137/", idr_image(9846137, image.title, volume.shape))
        self.env |= {
            "EM_IDR_API_URL": self.http.url + "/api/v0/m/images/{image_id}/",
            "EM_IDR_ARCHIVE_FTP": self.ftp.url + "/IDR/",
            "EM_IDR_ARCHIVE_HTTPS": self.http.url + "/IDR/",
        }

    def _epfl(self) -> None:
        import tifffile

        tifffile.imwrite(
            self.http.root / "volumedata.tif", em_texture((8, 128, 160), seed=18, dtype=np.uint8)
        )
        self.env["EM_EPFL_FILE_URL"] = self.http.url_for("volumedata.tif")
