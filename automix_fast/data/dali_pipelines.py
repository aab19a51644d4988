"""DALI pipeline definitions for image folders (the loader wrapper is `automix_fast.data.dali`).

Import this module only where DALI is installed: it imports nvidia.dali at the top. Every
pipeline takes its files from an external source (one batch of encoded paths and labels per
iteration, planned in Python by the loader) and reads them with `fn.io.file.read` on DALI's
threads, so the loader alone decides the order, the sharding and the size of every batch
(a partial last validation batch is just a smaller batch, never padding).

The same definitions serve both modes:
- GPU (`device_id` set): decode on device "mixed" (nvJPEG, the A100/H100 hardware JPEG engine
  for `hw_decoder_load` of the images), then resize / crop / flip / normalize on the GPU.
- CPU-only (`device_id=None`): decode with libjpeg-turbo ("cpu"), cpu operators throughout.

Images leave the pipeline normalized, as HWC float (FLOAT16 or FLOAT): a batch is an NHWC
buffer, which the loader views as a channels-last NCHW tensor without copying.
"""
from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath

from .transforms import eval_resize_for

# Decoder settings used on the GPU ("mixed") only. Sized for ImageNet-like JPEGs (mostly around
# 500x375, a few up to ~6000x6000): the paddings are the per-thread nvJPEG buffers of NVIDIA's
# ImageNet ResNet-50 DALI example (big enough for the largest ImageNet image, so the decoder
# never reallocates mid-epoch); 0.65 is DALI's default share for the hardware JPEG decoder.
# All four still need measuring on the target GPU (bench/bench_loader.py, see bench/README.md).
GPU_DECODER_LARGE = dict(
    hw_decoder_load=0.65,
    preallocate_width_hint=5980,
    preallocate_height_hint=6430,
    device_memory_padding=211025920,
    host_memory_padding=140544512,
)
# Tiny images (CIFAR-like, <= 64 px): DALI's default paddings (16 MiB / 8 MiB) are already far
# larger than any image; no hardware-decoder preallocation.
GPU_DECODER_SMALL = dict(hw_decoder_load=0.65)

RANDOM_AREA = (0.08, 1.0)
RANDOM_ASPECT_RATIO = (3 / 4, 4 / 3)
CIFAR_PAD = 4
# The resampling filters by their config name (config.sections.INTERPOLATIONS), antialiased
# (widened with the downscale) as PIL's: DALI's cubic is PIL's bicubic kernel (a = -0.5). DALI
# keeps floats between its two passes where PIL rounds to uint8: the two agree within
# tests/tolerances.py RESAMPLED_LEVELS.
INTERP_TYPES = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}


def _read(source):
    """`source()` -> one batch of (encoded paths, labels); the files are read on DALI's threads."""
    paths, labels = fn.external_source(
        source=source, num_outputs=2, dtype=[types.UINT8, types.INT64], ndim=[1, 0], batch=True
    )
    # Labels go through the pipeline with their images so they can never fall out of step.
    return fn.io.file.read(paths), labels


def _decoder_kwargs(gpu: bool, large: bool) -> dict:
    if not gpu:
        return {}
    return dict(GPU_DECODER_LARGE if large else GPU_DECODER_SMALL)


def _normalize(images, *, mean, std, out_dtype, mirror=None):
    kwargs = {}
    if mirror is not None:
        kwargs["mirror"] = mirror
    return fn.crop_mirror_normalize(
        images,
        dtype=out_dtype,
        output_layout="HWC",  # NHWC batch = channels-last NCHW view, no copy in torch
        mean=[255.0 * m for m in mean],
        std=[255.0 * s for s in std],
        **kwargs,
    )


def _resize(images, width, height, interpolation: str):
    return fn.resize(images, resize_x=width, resize_y=height, interp_type=INTERP_TYPES[interpolation], antialias=True)


def _resize_center_crop(images, resize_to: int, size: int, interpolation: str):
    """The torch loader's `resize_center_crop` (torchvision's Resize + CenterCrop) to the pixel:
    the shorter side to `resize_to`, the longer one resize_to * long // short (int() of the
    ratio, not rounded), then the size x size crop at int(round((side - size) / 2)), Python's
    round half to even. Worked out per sample from the decoded shape with DALI's integer
    arithmetic (DALI's own resize_shorter rounds the long side, and its centre crop rounds the
    anchor half up: with an odd margin the crop would sit 1 px off)."""
    shape = images.shape()  # (H, W, C) on the CPU, whatever the images' device
    h, w = shape[0], shape[1]
    short = dmath.min(h, w)
    new_h, new_w = resize_to * h // short, resize_to * w // short
    images = _resize(images, fn.cast(new_w, dtype=types.FLOAT), fn.cast(new_h, dtype=types.FLOAT), interpolation)

    def anchor(side):
        margin = side - size
        half = margin // 2
        return half + (margin % 2) * (half % 2)  # an odd margin: the even one of half, half + 1

    start = fn.cast(fn.stack(anchor(new_h), anchor(new_w)), dtype=types.INT32)
    return fn.slice(images, start=start, shape=[size, size], axis_names="HW")


def _reflect_pad(images, pad: int, size: int):
    """size x size HWC images padded by `pad` on every side with their mirror image, the edge
    pixel not repeated (torchvision's padding_mode='reflect'): mirrored strips joined on."""
    def mirrored(images, start, shape, vertical: bool):
        strip = fn.slice(images, start=start, shape=shape, axis_names="HW")
        return fn.flip(strip, horizontal=int(not vertical), vertical=int(vertical))

    top = mirrored(images, [1, 0], [pad, size], vertical=True)  # rows pad..1 above row 0
    bottom = mirrored(images, [size - 1 - pad, 0], [pad, size], vertical=True)  # rows size-2.. below
    images = fn.cat(top, images, bottom, axis_name="H")
    left = mirrored(images, [0, 1], [size + 2 * pad, pad], vertical=False)
    right = mirrored(images, [0, size - 1 - pad], [size + 2 * pad, pad], vertical=False)
    return fn.cat(left, images, right, axis_name="W")


def pad_crop(images, shift, size: int, padding_mode: str):
    """The size x size window at `shift` (INT32 (dy, dx), each in [-CIFAR_PAD, CIFAR_PAD]) of
    size x size HWC images padded by CIFAR_PAD: with zeros, or by reflection."""
    if padding_mode == "reflect":
        return fn.slice(_reflect_pad(images, CIFAR_PAD, size), start=shift + CIFAR_PAD, shape=[size, size],
                        axis_names="HW")
    return fn.slice(images, start=shift, shape=[size, size], axis_names="HW", out_of_bounds_policy="pad",
                    fill_values=0)


@pipeline_def(enable_conditionals=False)
def train_pipeline(*, source, gpu: bool, img_size: int, aug: str, mean, std, out_dtype, interpolation="bilinear",
                   crop_padding_mode="zeros"):
    """Training augmentation; every resize with the `interpolation` filter.

    imagenet: fused decode + random-resized-crop (area [0.08, 1], aspect [3/4, 4/3], ROI decode
    where the decoder can) -> resize to img_size x img_size -> random flip + normalize.
    cifar: decode -> shorter side to img_size, center img_size crop -> random crop with 4 px
    padding, zeros or by reflection (`crop_padding_mode`) -> random flip + normalize
    (torchvision RandomCrop(padding=4, padding_mode) + flip).
    """
    data, labels = _read(source)
    device = "mixed" if gpu else "cpu"
    mirror = fn.random.coin_flip(probability=0.5)
    if aug == "imagenet":
        images = fn.decoders.image_random_crop(
            data,
            device=device,
            output_type=types.RGB,
            random_area=list(RANDOM_AREA),
            random_aspect_ratio=list(RANDOM_ASPECT_RATIO),
            num_attempts=10,
            **_decoder_kwargs(gpu, large=True),
        )
        images = _resize(images, img_size, img_size, interpolation)
        images = _normalize(images, mean=mean, std=std, out_dtype=out_dtype, mirror=mirror)
    else:
        images = fn.decoders.image(data, device=device, output_type=types.RGB, **_decoder_kwargs(gpu, large=False))
        images = _resize_center_crop(images, img_size, img_size, interpolation)
        shift = fn.random.uniform(values=list(range(-CIFAR_PAD, CIFAR_PAD + 1)), shape=[2], dtype=types.INT32)
        images = pad_crop(images, shift, img_size, crop_padding_mode)
        images = _normalize(images, mean=mean, std=std, out_dtype=out_dtype, mirror=mirror)
    return images, labels


@pipeline_def(enable_conditionals=False)
def val_pipeline(*, source, gpu: bool, img_size: int, aug: str, mean, std, out_dtype, crop_pct=None,
                 interpolation="bilinear"):
    """Deterministic evaluation: decode -> shorter side to img_size / crop_pct (by default 0.875
    with imagenet aug, 1 with cifar), as the torch loader's `eval_resize_for`, with the
    `interpolation` filter -> center crop img_size + normalize."""
    data, labels = _read(source)
    images = fn.decoders.image(
        data, device="mixed" if gpu else "cpu", output_type=types.RGB, **_decoder_kwargs(gpu, aug == "imagenet")
    )
    images = _resize_center_crop(images, eval_resize_for(img_size, aug, crop_pct), img_size, interpolation)
    images = _normalize(images, mean=mean, std=std, out_dtype=out_dtype)
    return images, labels


@pipeline_def(enable_conditionals=False)
def decode_pipeline(*, source, gpu: bool):
    """Plain decode with the loaders' decoder settings: uint8 HWC RGB at the file's own size (tests)."""
    data, labels = _read(source)
    images = fn.decoders.image(data, device="mixed" if gpu else "cpu", output_type=types.RGB, **_decoder_kwargs(gpu, True))
    return images, labels


def build_pipeline(args: dict, *, source, batch_size: int, prefetch: int, seed: int):
    """A built train or val pipeline from the loader's picklable description `args` (train, gpu,
    img_size, aug, crop_pct, interpolation, crop_padding_mode, mean, std, half, num_threads, device_id); the
    loader and its decoding process (`dali_child.py`) both build through here, so the two make the same pipeline."""
    definition = train_pipeline if args["train"] else val_pipeline
    own = ({"crop_padding_mode": args.get("crop_padding_mode", "zeros")} if args["train"]
           else {"crop_pct": args.get("crop_pct")})
    pipe = definition(
        **own,
        source=source,
        gpu=args["gpu"],
        img_size=args["img_size"],
        aug=args["aug"],
        interpolation=args.get("interpolation", "bilinear"),
        mean=args["mean"],
        std=args["std"],
        out_dtype=types.FLOAT16 if args["half"] else types.FLOAT,
        batch_size=batch_size,
        num_threads=args["num_threads"],
        device_id=args["device_id"],
        seed=seed,
        prefetch_queue_depth=prefetch,
    )
    pipe.build()
    return pipe
