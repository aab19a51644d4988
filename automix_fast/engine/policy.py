"""What a config resolves to on this machine (device, loader, mixed precision) and the network
with its mixing policy: shared by train, eval and visualize, so a checkpoint's `mixer` state
always loads into what they build."""
from __future__ import annotations

import torch

from automix_fast.data.dali import dali_available
from automix_fast.engine.train_options import mixer_options, model_options
from automix_fast.errors import ConfigError
from automix_fast.mixing import build_mixer
from automix_fast.models import create_model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available (use --device cpu)")
    return torch.device(name)


def resolve_loader(name: str) -> str:
    if name != "auto":
        return name
    return "dali" if dali_available() else "torch"


def resolve_amp(run, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the `run` section, or None: --amp as given, else on with CUDA."""
    use_amp = run.amp if run.amp is not None else device.type == "cuda"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[run.amp_dtype] if use_amp else None


def create_policy_model(cfg, num_classes: int):
    """The online network of `cfg.net` (with the mixed-label head when the policy is AutoMix)."""
    return create_model(cfg.net.model, num_classes=num_classes, mix_head=cfg.mixing.mix == "automix",
                        **model_options(cfg.net))


def wrap_policy(cfg, model, *, mix_stage: int | None = None, rank: int = 0):
    """The mixing policy of `cfg.mixing` around `model` (AutoMix adds the Mix Block and momentum
    encoder), seeded by `cfg.run.seed`."""
    mixing = cfg.mixing
    return build_mixer(
        mixing.mix, model, alpha=mixing.mix_alpha, seed=cfg.run.seed, rank=rank, smoothing=mixing.smoothing,
        momentum_base=mixing.encoder_momentum, momentum_end=mixing.encoder_momentum_end,
        mask_loss_weight=mixing.mask_loss_weight, mask_loss_anneal=mixing.mask_loss_anneal,
        mask_margin=mixing.mask_margin, lam_margin=mixing.lam_margin, lam_concat=mixing.lam_concat,
        mask_mode=mixing.mask_mode, mix_stage=mix_stage or mixing.mix_stage or model.mix_stage,
        kernel_backend=mixing.kernel_backend, k_full_forward=mixing.k_full_forward,
        mix_shuffle_no_repeat=mixing.mix_shuffle_no_repeat, mix_block_init=mixing.mix_block_init,
        mix_block_every=mixing.mix_block_every, q_batched=mixing.q_batched, **mixer_options(mixing),
    )


def check_compile_backend(name) -> None:
    """ConfigError in one line unless `name` (the --torchcompile value; False: off) is a
    torch.compile backend."""
    if not name:
        return
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if name not in known:
        shown = sorted(set(torch._dynamo.list_backends()) | ({"aot_eager", "eager"} & set(known)))
        raise ConfigError(f"--torchcompile: torch.compile has no backend '{name}' (it has {', '.join(shown)})")


def compile_policy(mixer, backend: str = "inductor", *, mode: str | None = None, scope: str = "encoders",
                   mix: str | None = None) -> str:
    """torch.compile what `scope` names (--torchcompile-scope) with `backend` and `mode`: `step`,
    for a policy with a whole-step graph (AutoMix's `compile_step`), its loss step; else
    (`encoders`, or a policy without one) the model and the momentum encoder, each in place.
    Returns the line that says what was compiled (`mix`: the policy's --mix name), to print
    before the first step."""
    options = {"backend": backend, "mode": mode}
    mix = mix or mixer.name
    if scope == "step" and hasattr(mixer, "compile_step"):
        mixer.compile_step(**options)
        what = f"the whole loss step of --mix {mix} (2 graphs: with and without the Mix Block branch)"
    else:
        mixer.model.compile(**options)
        what = "the model"
        if mixer.momentum_encoder is not None:
            mixer.momentum_encoder.compile(**options)
            what = "the model and the momentum encoder"
        if scope == "step":
            what += f" (--mix {mix} has no whole-step graph)"
    return (f"torch.compile ({backend}{f', mode {mode}' if mode else ''}): {what}; the first steps are slower while "
            "it compiles; leave out --torchcompile (or pass --no-torchcompile) to run eager")
