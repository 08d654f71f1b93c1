"""A run's own TLS for its Dask scheduler, its client and its SLURM worker jobs.

A Dask scheduler runs whatever a connected client sends it, in the run's process, which holds the run's secrets;
so each run makes a CA and a certificate of its own (Dask's ``Security.temporary()``), and the scheduler takes
only connections that present it. The scheduler and the run's client keep their key in memory. The workers, batch
jobs on other nodes, read theirs from the shared job folder: a folder of the run's own (``0700``) holding the
CA certificate and the worker's certificate and key, each created ``0600``
(:func:`em_platform.storage.private.write_private`), so a key is never readable by another user, not even
between its creation and a ``chmod``. :meth:`RunCertificates.remove` deletes them when the run's cluster closes.

Dagster-free, like the rest of :mod:`em_platform.cluster`.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from em_platform.storage.private import write_private


class RunCertificates:
    """The run's CA and certificate: :attr:`security` for the scheduler, the run's client and (as file paths in
    :attr:`folder`) the worker jobs."""

    def __init__(self, shared_folder: str) -> None:
        from distributed.security import Security

        made = Security.temporary()  # one self-signed certificate: the CA, and every role's certificate
        # mkdtemp: a new folder, 0700, under a name no other run has
        self.folder = tempfile.mkdtemp(prefix=".tls-", dir=shared_folder)
        try:
            files = {}
            for name, text in (
                ("ca.pem", made.tls_ca_file),
                ("worker-cert.pem", made.tls_worker_cert),
                ("worker-key.pem", made.tls_worker_key),
            ):
                files[name] = os.path.join(self.folder, name)
                write_private(files[name], text)
        except BaseException:
            self.remove()
            raise
        self.security = Security(
            require_encryption=True,
            tls_ca_file=files["ca.pem"],
            tls_scheduler_cert=made.tls_scheduler_cert,
            tls_scheduler_key=made.tls_scheduler_key,
            tls_client_cert=made.tls_client_cert,
            tls_client_key=made.tls_client_key,
            # paths, not PEM text: dask-jobqueue passes them to the workers' command line as they are
            tls_worker_cert=files["worker-cert.pem"],
            tls_worker_key=files["worker-key.pem"],
        )

    def remove(self) -> None:
        """The workers' copies gone (again: a no-op)."""
        shutil.rmtree(self.folder, ignore_errors=True)
