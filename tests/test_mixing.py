"""mixing/__init__.py: build_mixer's errors."""
from __future__ import annotations

import pytest

from automix_fast.mixing import build_mixer
from automix_fast.models import create_model


def test_unknown_policy_and_missing_mix_head():
    from automix_fast.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown mix policy 'puzzle'"):
        build_mixer("puzzle", create_model("tinynet", num_classes=3))
    with pytest.raises(ValueError, match="mix_head"):
        build_mixer("automix", create_model("tinynet", num_classes=3))
