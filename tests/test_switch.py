"""One reading of on/off settings: the source registry's and the SLURM cluster's agree word for word."""

import pytest

from em_platform.cluster.slurm import SlurmSettingError, _flag
from em_platform.switch import OFF, ON, parse_switch


@pytest.mark.parametrize("word", [*ON, *(w.upper() for w in ON), " on "])
def test_on_words(word):
    assert parse_switch(word) is True
    assert _flag("EM_SLURM_TLS", word) is True


@pytest.mark.parametrize("word", [*OFF, "False", " 0"])
def test_off_words(word):
    assert parse_switch(word) is False
    assert _flag("EM_SLURM_TLS", word) is False


def test_unset_slurm_switch_is_off():
    assert _flag("EM_SLURM_TLS", "") is False


@pytest.mark.parametrize("word", ["2", "enable", "tru", "y"])
def test_other_words_are_refused_naming_the_setting(word):
    with pytest.raises(ValueError, match="1 \\(on\\) or 0 \\(off\\)"):
        parse_switch(word)
    with pytest.raises(SlurmSettingError, match=f"EM_SLURM_TLS={word!r}"):
        _flag("EM_SLURM_TLS", word)
