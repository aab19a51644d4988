"""Engine: the pieces the training loop is built from.

    checkpoint   atomic, checksummed checkpoints; CheckpointManager; resume; RNG state
    schedule     LR schedules as pure functions of the step (cosine/step/const + warmup)
    metrics      top-k counts, device-side running means, metrics.jsonl, console progress
    optim        SGD (fused on CUDA) / AdamW / apex FusedSGD; no-decay param groups
    distributed  torchrun helpers, no-ops in a single process

Submodules are imported where used, so importing the package stays free of work.
"""
