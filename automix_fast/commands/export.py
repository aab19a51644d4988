"""`automix-fast export`: one encoder and its classifier head of a checkpoint as plain weights
(.safetensors or .pt) or a whole program (.pt2, .onnx), plus a JSON of what is needed to use
them (see automix_fast.export)."""
from __future__ import annotations

from pathlib import Path

from automix_fast.commands.common import read_training_checkpoint
from automix_fast.config import build_config
from automix_fast.data import DataSpec, view_options
from automix_fast.data.torch_loader import resolve_aug
from automix_fast.data.transforms import eval_resize_for
from automix_fast.engine.checkpoint import state_dict_mismatch
from automix_fast.errors import CheckpointError
from automix_fast.export import (PROGRAM_FORMATS, check_output, export_state, file_format, from_export_keys,
                                 torchvision_name, write_export)
from automix_fast.models import create_model


def run(args) -> int:
    state = read_training_checkpoint(args.checkpoint)
    output = check_output(args.output or Path(args.checkpoint).with_name(f"{Path(args.checkpoint).stem}-{args.head}.safetensors"))
    cfg = build_config({**state["config"], "resume": None, "experiment": None})  # a run setting: not the export's
    arch, num_classes = state["model_name"], int(state["num_classes"])
    weights = export_state(state["mixer"], arch, args.head, args.classifier)
    tv = torchvision_name(arch)
    fresh = create_model(arch, num_classes=num_classes)
    try:  # what a user will do with the file, done once here: it must load strictly
        fresh.load_state_dict({from_export_keys(k, tv is not None): v for k, v in weights.items()})
    except RuntimeError as e:
        raise CheckpointError(f"{args.checkpoint}: encoder {args.head} does not match {arch}: "
                              f"{state_dict_mismatch(e)}") from None
    img_size = cfg.data.img_size or fresh.default_img_size
    view = DataSpec(img_size=img_size, aug=cfg.data.aug, **view_options(cfg.data))
    aug = resolve_aug(view)
    meta = {
        "format": "automix-fast-export/1",
        "model": arch,
        "torchvision_model": tv,
        "stem": "cifar" if arch.endswith("_cifar") else ("imagenet" if tv else fresh.stem_type),
        "key_names": "torchvision" if tv else "automix-fast",
        "num_classes": num_classes,
        "classes": list(state.get("classes") or []),
        "image_size": img_size,
        "eval_resize": eval_resize_for(img_size, aug, view.crop_pct),  # shorter side before the centre crop
        "interpolation": view.interpolation,  # the resampling filter of that resize (PIL's, antialiased)
        "mean": list(view.mean),
        "std": list(view.std),
        "input": "RGB, NCHW, float in [0, 1], then (x - mean) / std",
        "encoder": args.head,
        "classifier": args.classifier,
        "mix": cfg.mixing.mix,
        "epoch": state.get("epoch"),
        "checkpoint": str(Path(args.checkpoint)),
    }
    weights_path, meta_path = write_export(weights, meta, output, model=fresh)
    fmt = file_format(output)
    kind = (f"a {fmt} program, input (batch, 3, {img_size}, {img_size})" if fmt in PROGRAM_FORMATS
            else f"{'torchvision' if tv else 'automix-fast'} key names")
    print(f"{weights_path}: {arch} encoder {args.head}, head '{args.classifier}' as fc, {num_classes} classes, {kind}")
    print(f"{meta_path}: classes, image size, normalisation")
    return 0
