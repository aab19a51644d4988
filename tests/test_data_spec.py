"""data/spec.py: a bad DataSpec names its field."""
from __future__ import annotations

import pytest

from automix_fast.data import DataSpec, build_loaders
from automix_fast.errors import ConfigError


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("img_size", 4), ("loader", "tf"), ("aug", "x"),
                                         ("dataset", "mnist"), ("rank", 2), ("workers", -1), ("eval_batch_size", 0)])
def test_bad_spec_names_field(field, value):
    spec = DataSpec(world_size=2)
    setattr(spec, field, value)
    with pytest.raises(ConfigError, match=field):
        build_loaders(spec)
