"""Fused Triton kernels of the Mix Block's two ops.

    mask_mix            mask upsample + sigmoid + blend with the permuted partner
    mixblock_attention  cross-attention with a one-channel value
    common              shared host helpers (buffers, tile sizes, dtypes, layout tests)
    launches            every launch goes through `launch`, which can record instead of run

Each op module holds the math in its docstring, the forward and backward kernels, the host
launchers and the autograd Function; it imports triton, so `automix_fast.ops` imports it on
first use. `common` and `launches` do not import triton. Nothing here imports
`automix_fast.ops` (the ops import the kernels, not the other way round), and nothing here
is imported by `import automix_fast`.
"""
