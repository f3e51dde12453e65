"""The package's public names resolve, and a wrong name fails like any missing attribute."""

import pytest

import slip


@pytest.mark.parametrize("name", slip.__all__)
def test_every_export_resolves(name):
    assert getattr(slip, name).__name__ == name


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        slip.nope  # noqa: B018
