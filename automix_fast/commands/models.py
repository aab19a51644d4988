"""`automix-fast models`: one line per registered model."""
from __future__ import annotations


def run(args) -> int:
    from automix_fast.models import list_models, model_summary

    for name in list_models():
        print(model_summary(name))
    return 0
