"""The package's lazy top level: every public name and every submodule is reachable as sd.<name>."""

from pathlib import Path

import pytest

import sd


def test_every_submodule_is_listed():
    files = {p.stem for p in Path(sd.__file__).parent.glob("*.py")} - {"__init__", "__main__"}
    assert files == sd._SUBMODULES


@pytest.mark.parametrize("name", sorted(sd._API))
def test_public_names_resolve(name):
    assert getattr(sd, name).__module__ == f"sd.{sd._API[name]}"


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="module 'sd' has no attribute 'genrate'"):
        sd.genrate
