"""A run's TLS certificates (no SLURM needed): the workers' copies are created 0600 in a 0700 folder of the run's
own, whatever the umask, never through a link left in the shared folder, and are gone when removed."""

from __future__ import annotations

import os
import stat

import pytest

from em_platform.cluster.run_certificates import RunCertificates
from em_platform.storage.private import write_private


@pytest.fixture
def no_umask_no_chmod(monkeypatch):
    """A umask that narrows nothing, and chmod refused: a file comes out 0600 only if it was created so."""

    def refused(*args, **kwargs):
        raise AssertionError(f"chmod{args}: a key file must be created private, not narrowed afterwards")

    for name in ("chmod", "fchmod", "lchmod"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refused)
    old = os.umask(0)
    yield
    os.umask(old)


def test_the_workers_copies_are_private_from_their_creation_and_removed(tmp_path, no_umask_no_chmod):
    certificates = RunCertificates(str(tmp_path))

    folder = certificates.folder
    assert os.path.dirname(folder) == str(tmp_path)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    worker = certificates.security.get_tls_config_for_role("worker")
    files = [worker["ca_file"], worker["cert"], worker["key"]]
    assert {os.path.dirname(f) for f in files} == {folder}
    assert {stat.S_IMODE(os.stat(f).st_mode) for f in files} == {0o600}
    assert "PRIVATE KEY" in open(worker["key"]).read()
    # the scheduler's and the run's client's key stay in memory; every connection must be TLS
    assert certificates.security.require_encryption
    for role in ("scheduler", "client"):
        assert "PRIVATE KEY" in certificates.security.get_tls_config_for_role(role)["key"]
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(folder)]

    certificates.remove()
    assert not os.listdir(tmp_path)
    certificates.remove()  # again: nothing to do


def test_a_key_is_never_written_through_a_link(tmp_path):
    """A link left where a key goes is replaced, not followed: the file it points to is untouched."""
    elsewhere = tmp_path / "elsewhere.pem"
    elsewhere.write_text("")
    (tmp_path / "link.pem").symlink_to(elsewhere)

    write_private(str(tmp_path / "link.pem"), "key")
    assert elsewhere.read_text() == ""
    assert not (tmp_path / "link.pem").is_symlink() and (tmp_path / "link.pem").read_text() == "key"
    assert oct((tmp_path / "link.pem").stat().st_mode & 0o777) == "0o600"
