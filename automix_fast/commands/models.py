"""`automix-fast models`: one line per registered model."""
from __future__ import annotations

from automix_fast.models import list_models, model_summary


def run(args) -> int:
    for name in list_models():
        print(model_summary(name))
    return 0
