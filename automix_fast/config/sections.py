"""The sections of the training config, one per component that reads them: `data` (the
loaders), `net` (the network), `mixing` (the mixing policy), `optim` (the optimizer and the
step), `schedule` (epochs and learning-rate schedule) and `run` (device, precision, output,
checkpoints, logging). Each field's help, choices and resume rule live in its `option(...)`;
`check()` holds the section's own range checks (checks across sections: automix_fast.config).
"""
from __future__ import annotations

from dataclasses import dataclass

from automix_fast.config.fields import Section, option, require

# The allowed values of the fields with a fixed set; the components that take them import them from here.
DATASETS = ("auto", "embedded", "folder", "cifar10", "cifar100")
LOADERS = ("auto", "dali", "torch")
AUGS = ("auto", "cifar", "imagenet")
CROP_PADDING_MODES = ("zeros", "reflect")
INTERPOLATIONS = ("bilinear", "bicubic")
MIXES = ("vanilla", "mixup", "cutmix", "automix")
MASK_LOSS_ANNEALS = ("none", "cosine", "compound")
MASK_MODES = ("nearest", "bilinear")
KERNEL_BACKENDS = ("auto", "triton", "torch")
MIX_BLOCK_INITS = ("official", "scaled", "cosine", "cosine-centered")
MIXUP_MODES = ("batch", "pair", "elem")
OPTIMIZERS = ("sgd", "adamw", "fused_sgd", "apex_sgd")
CLIP_MODES = ("norm", "value", "agc")
SCHEDULES = ("cosine", "step", "multistep", "const")
DEVICES = ("auto", "cpu", "cuda")
AMP_DTYPES = ("bfloat16", "float16")
TORCHCOMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TORCHCOMPILE_SCOPES = ("encoders", "step")


def plain_name(name: str) -> bool:
    """A file name without any folder part (no / or \\, not . or ..): what --experiment names
    under --output, so the run folder can never be outside it."""
    return name not in (".", "..") and not any(sep in name for sep in ("/", "\\"))


@dataclass
class DataOptions(Section):
    """What the loaders read: the dataset, its split and subset, batch sizes, workers, augmentation."""

    data_dir: str | None = option(
        None, "dataset folder: ImageFolder train/ and val/ (or test/), train/ alone or DIR/<class>/ with --val-split,"
        " or CIFAR python batches; none: the embedded default")
    dataset: str = option("auto", "what --data-dir holds; auto: detected", choices=DATASETS)
    loader: str = option(
        "auto", "data loader: DALI, torch, or auto (DALI when installed)", choices=LOADERS, resumable=True)
    workers: int = option(2, "loader worker processes/threads per process", aliases=("-j",), resumable=True)
    img_size: int | None = option(None, "training image size in pixels; none: the model's default")
    aug: str = option(
        "auto", "augmentation: cifar (pad-crop-flip), imagenet (random-resized-crop), auto (cifar up to 64 px)",
        choices=AUGS)
    crop_padding_mode: str = option(
        "zeros", "cifar aug: how the 4 px border of the random crop is filled: zeros, or reflect (the image mirrored "
        "without repeating its edge, torchvision's padding_mode='reflect'; OpenMixup's CIFAR-100)",
        choices=CROP_PADDING_MODES)
    crop_pct: float | None = option(
        None, "eval centre crop: the shorter side resized to img_size / crop_pct, then an img_size crop (timm's "
        "name); none: 0.875 with imagenet aug, 1 with cifar (no resize at the training size)")
    train_interpolation: str = option(
        "bilinear", "resampling filter of the training images' resize: the random-resized crop, or the shorter side to "
        "img_size with cifar aug (timm's name; not its 'random')", choices=INTERPOLATIONS)
    interpolation: str = option(
        "bilinear", "resampling filter of the eval images' resize (timm's name)", choices=INTERPOLATIONS)
    mean: list | None = option(
        None, "per-channel (RGB) normalisation mean, on the 0..1 scale (timm's); none: ImageNet's",
        items=(float, 3, ("R", "G", "B")))
    std: list | None = option(
        None, "per-channel (RGB) normalisation standard deviation (timm's); none: ImageNet's",
        items=(float, 3, ("R", "G", "B")))
    skip_bad_images: bool = option(
        False, "leave out unreadable image files (with a warning) instead of stopping", resumable=True)
    num_classes: int | None = option(None, "expected class count; none: from the data (a mismatch is an error)")
    val_split: float | None = option(
        None, "hold out this class-balanced fraction of a folder without val/ (DIR/train/ alone or DIR/<class>/) for "
        "validation; the same images on every run")
    batch_size: int = option(64, "images per batch per process", aliases=("-b",))
    validation_batch_size: int | None = option(
        None, "images per eval batch; none: twice --batch-size", aliases=("-vb",), resumable=True)
    train_subset: float | None = option(
        None, "train on this class-balanced fraction of the training set (e.g. 0.1; validation stays whole)")
    # Not --seed: every seed of a study sees the same images.
    train_subset_seed: int = option(
        0, "seed of the --train-subset draw (fixed apart from --seed, so seeds share the subset)")

    def check(self) -> None:
        super().check()
        require(self.batch_size >= 1, "batch_size", "must be at least 1", self.batch_size)
        if self.validation_batch_size is not None:
            require(self.validation_batch_size >= 1, "validation_batch_size", "must be at least 1",
                    self.validation_batch_size)
        require(self.workers >= 0, "workers", "must be 0 or more", self.workers)
        if self.img_size is not None:
            require(self.img_size >= 8, "img_size", "must be at least 8", self.img_size)
        if self.crop_pct is not None:
            require(0 < self.crop_pct <= 1, "crop_pct", "must be a fraction in (0, 1]", self.crop_pct)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                require(len(value) == 3, name, "needs 3 values (R G B)", value)
        if self.std is not None:
            require(all(v > 0 for v in self.std), "std", "must be positive", self.std)
        if self.num_classes is not None:
            require(self.num_classes >= 2, "num_classes", "must be at least 2", self.num_classes)
        if self.val_split is not None:
            require(0 < self.val_split < 1, "val_split", "must be a fraction in (0, 1)", self.val_split)
        if self.train_subset is not None:
            require(0 < self.train_subset <= 1, "train_subset", "must be a fraction in (0, 1]", self.train_subset)


@dataclass
class NetOptions(Section):
    """What the network builder reads: the architecture, stochastic depth, starting weights."""

    model: str = option("tinynet", "network (see `automix-fast models`)")
    drop_path: float | None = option(
        None, "stochastic depth: drop rate of the last residual block, rising linearly from 0 (ResNet family, WRN)")
    initial_checkpoint: str | None = option(
        None, "start from the model weights of this checkpoint (not its optimizer, step or epoch)")

    def check(self) -> None:
        super().check()
        if self.drop_path is not None:
            require(0 <= self.drop_path < 1, "drop_path", "must be in [0, 1)", self.drop_path)


@dataclass
class MixOptions(Section):
    """What the mixing policy reads: the policy, its lambda, AutoMix's Mix Block and momentum
    encoder, timm's mixup/cutmix settings and the baselines' EMA copy."""

    mix: str = option("automix", "mixing policy", choices=MIXES)
    mix_alpha: float | None = option(None, "Beta(alpha, alpha) for lambda; none: mixup 1.0, cutmix 0.2, automix 2.0")
    smoothing: float = option(0.0, "label smoothing")
    # AutoMix. The defaults suit the short default run (~1,200 steps); the shipped recipes set
    # 0.999 -> 0.999999 (CIFAR, Tiny) or 0.99999 (ImageNet) as OpenMixup does for 100k+ steps.
    encoder_momentum: float = option(
        0.99, "AutoMix momentum encoder: EMA momentum at the start (the cosine rise begins at 10%% of training)")
    encoder_momentum_end: float = option(0.999, "EMA momentum at the end (recipes: 0.999999 CIFAR, 0.99999 ImageNet)")
    mask_loss_weight: float = option(0.1, "weight of the Mix Block mask loss")
    mask_loss_anneal: str = option(
        "none", "mask loss weight over training: none, cosine to 0, or compound (the official hook, ImageNet recipes)",
        choices=MASK_LOSS_ANNEALS)
    mask_margin: float = option(0.1, "mask loss margin around lambda")
    lam_margin: float = option(0.08, "plain mixup instead of the Mix Block mask when min(lam, 1-lam) <= this")
    lam_concat: bool = option(False, "append lambda as a feature channel in the Mix Block (ImageNet recipes)")
    mask_mode: str = option("nearest", "Mix Block mask upsampling", choices=MASK_MODES)
    mix_stage: int | None = option(
        None, "backbone stage whose features feed the Mix Block; none: the model's (3 for ResNets)")
    kernel_backend: str = option(
        "auto", "Mix Block ops: Triton kernels, the torch reference, or auto (Triton on CUDA)",
        choices=KERNEL_BACKENDS, resumable=True)
    k_full_forward: bool = option(
        True, "k runs all its stages on the clean batch (official; BN statistics), not only to the mix stage")
    mix_shuffle_no_repeat: bool = option(False, "permutations without fixed points (official fine-grained recipes)")
    mix_block_init: str = option(
        "official", "Mix Block attention start: official N(0, 0.01) W_q, scaled (W_q ~ N(0, 1/C)), cosine (normalised"
        " q, k with a learnable temperature from 10), or cosine-centered (q, k centred over each image's positions "
        "first); see docs/QUALITY.md", choices=MIX_BLOCK_INITS)
    mix_block_every: int = option(
        1, "update the Mix Block every N-th step; the others use its masks without gradient and skip x_mb and k's "
        "pass on it (AutoMix)")
    q_batched: bool = option(
        False, "q's clean and mixed passes as one forward and backward over both batches (fewer, larger kernels; "
        "BatchNorm's statistics span both batches: not the official step) (AutoMix)")
    # timm's mixup/cutmix flags, with timm's meanings (docs/TIMM_FLAGS.md); see resolve_mixup_cutmix.
    mixup: float | None = option(
        None, "mixup alpha, as timm (0: off); with --cutmix too, one of the two per batch (sets --mix; see "
        "docs/TIMM_FLAGS.md)")
    cutmix: float | None = option(None, "cutmix alpha, as timm (0: off)")
    mixup_prob: float = option(1.0, "probability of mixing a batch at all (mixup/cutmix)")
    mixup_switch_prob: float = option(
        0.5, "probability of cutmix rather than mixup for a batch when both alphas are positive")
    mixup_mode: str = option(
        "batch", "who shares one draw of lambda and mixup/cutmix: the batch, each pair of partners, or each image "
        "(elem)", choices=MIXUP_MODES)
    cutmix_minmax: list | None = option(
        None, "cutmix box height and width uniform in these fractions of the image's, not from lambda (turns cutmix "
        "on, as timm)", items=(float, 2, ("MIN", "MAX")))
    model_ema: bool = option(False, "keep an EMA copy of the weights, evaluated as head 'ema' (vanilla/mixup/cutmix)")
    model_ema_decay: float = option(0.9998, "decay of the EMA copy per optimizer step")
    model_ema_warmup: bool = option(
        False, "timm's EMA warm-up: the t-th update's decay is 1 - t^(-2/3) until that reaches --model-ema-decay")

    def check(self) -> None:
        super().check()
        require(0 <= self.smoothing < 1, "smoothing", "must be in [0, 1)", self.smoothing)
        if self.mix_alpha is not None:
            require(self.mix_alpha > 0, "mix_alpha", "must be positive (Beta(alpha, alpha))", self.mix_alpha)
        require(0 < self.encoder_momentum < 1, "encoder_momentum", "must be in (0, 1)", self.encoder_momentum)
        require(0 < self.encoder_momentum_end < 1, "encoder_momentum_end", "must be in (0, 1)",
                self.encoder_momentum_end)
        require(self.mask_loss_weight >= 0, "mask_loss_weight", "must be 0 or more", self.mask_loss_weight)
        require(self.mask_margin >= 0, "mask_margin", "must be 0 or more", self.mask_margin)
        require(0 <= self.lam_margin < 0.5, "lam_margin", "must be in [0, 0.5)", self.lam_margin)
        if self.mix_stage is not None:
            require(self.mix_stage >= 1, "mix_stage", "must be at least 1", self.mix_stage)
        require(0 <= self.mixup_prob <= 1, "mixup_prob", "must be in [0, 1]", self.mixup_prob)
        require(0 <= self.mixup_switch_prob <= 1, "mixup_switch_prob", "must be in [0, 1]", self.mixup_switch_prob)
        require(0 < self.model_ema_decay < 1, "model_ema_decay", "must be in (0, 1)", self.model_ema_decay)
        require(self.model_ema or not self.model_ema_warmup, "model_ema_warmup", "needs --model-ema",
                self.model_ema_warmup)
        require(self.mix in ("mixup", "cutmix") or self.mixup_mode == "batch", "mixup_mode",
                f"is for --mix mixup/cutmix (not --mix {self.mix})", self.mixup_mode)
        require(not (self.model_ema and self.mix == "automix"), "model_ema",
                "is for the baselines; AutoMix's momentum encoder k (heads k_one, k_mix) is its EMA model, "
                "set by --encoder-momentum", self.model_ema)
        require(self.mix_block_every >= 1, "mix_block_every", "must be at least 1", self.mix_block_every)


@dataclass
class OptimOptions(Section):
    """What the optimizer and the step read: the optimizer, its parameter groups (the Mix Block's
    own), gradient clipping and accumulation."""

    opt: str = option(
        "sgd", "optimizer: sgd is momentum SGD without Nesterov, as the official recipes (timm's sgd is Nesterov); "
        "adamw; fused_sgd or apex_sgd: NVIDIA apex's FusedSGD (needs apex)", choices=OPTIMIZERS)
    # 0.05 with one warmup epoch: the measured best of the two tried for the default run.
    lr: float = option(0.05, "peak learning rate (for the batch size given; scale it yourself with the global batch)")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(
        0.0005, "weight decay; the backbone's biases and norm weights are exempt (timm's rule; see "
        "--decay-norm-and-bias), the Mix Block's group decays every parameter, biases included (as the official code)")
    decay_norm_and_bias: bool = option(
        False, "weight decay on every parameter (official/mmcv) instead of timm's bias/norm exemption")
    mix_block_lr: float | None = option(None, "Mix Block learning rate; none: --lr")
    mix_block_weight_decay: float | None = option(
        None, "Mix Block weight decay, on every one of its parameters; none: --weight-decay")
    mix_block_momentum: float | None = option(
        None, "SGD momentum of the Mix Block's parameter group; none: --momentum")
    clip_grad: float | None = option(None, "gradient clipping threshold (none: off); fp16 gradients are unscaled first")
    clip_mode: str = option(
        "norm", "norm: total L2 norm; value: each element; agc: adaptive (the value is the clip factor; the "
        "classifier heads left out, as timm)",
        choices=CLIP_MODES)
    grad_accum_steps: int = option(
        1, "micro-batches of --batch-size per optimizer step; schedules and EMA count optimizer steps")

    def check(self) -> None:
        super().check()
        require(self.lr > 0, "lr", "must be positive", self.lr)
        require(0 <= self.momentum < 1, "momentum", "must be in [0, 1)", self.momentum)
        require(self.weight_decay >= 0, "weight_decay", "must be 0 or more", self.weight_decay)
        if self.mix_block_lr is not None:
            require(self.mix_block_lr > 0, "mix_block_lr", "must be positive", self.mix_block_lr)
        if self.mix_block_weight_decay is not None:
            require(self.mix_block_weight_decay >= 0, "mix_block_weight_decay", "must be 0 or more",
                    self.mix_block_weight_decay)
        if self.mix_block_momentum is not None:
            require(0 <= self.mix_block_momentum < 1, "mix_block_momentum", "must be in [0, 1)",
                    self.mix_block_momentum)
        if self.clip_grad is not None:
            require(self.clip_grad > 0, "clip_grad", "must be positive", self.clip_grad)
        require(self.grad_accum_steps >= 1, "grad_accum_steps", "must be at least 1", self.grad_accum_steps)


@dataclass
class ScheduleOptions(Section):
    """What the learning-rate schedule reads: its length, shape, floor and warmup."""

    epochs: int = option(15, "epochs to train (may be raised when resuming)", resumable=True)
    sched: str = option(
        "cosine", "learning-rate schedule after the warmup; the cosine moves once per epoch (every step with "
        "--sched-on-updates), step multiplies the lr by --decay-rate every --decay-epochs epochs, multistep at each "
        "of --decay-milestones, the warmup moves every step", choices=SCHEDULES)
    min_lr: float = option(0.0, "learning rate floor of the cosine schedule")
    decay_epochs: float | None = option(
        None, "--sched step: epochs between decays, fractions allowed (timm's; needed with --sched step)")
    decay_milestones: list | None = option(
        None, "--sched multistep: the epochs at which the lr decays (timm's; needed with --sched multistep)",
        items=(int, "+", "EPOCH"))
    decay_rate: float = option(0.1, "--sched step/multistep: the factor of each decay (timm's)")
    # none: 1 epoch, at most a quarter of the run (engine/schedule.py)
    warmup_epochs: float | None = option(
        None, "linear warmup length in epochs (fractions allowed); none: 1, at most a quarter of --epochs (a line "
        "says so when that cap applies; a value given is kept)")
    warmup_lr: float = option(1e-05, "learning rate at the start of warmup")
    mix_block_min_lr: float | None = option(None, "Mix Block learning-rate floor; none: --min-lr")
    sched_on_updates: bool = option(
        False, "the cosine and step schedules move every step instead of once per epoch (the default, as mmcv's); timm's flag, "
        "but our cosine spans the run after the warmup (timm's --warmup-prefix; timm's default runs it from step 0 "
        "under the warmup) and our warmup moves every step with or without it (timm's moves per epoch without it)")

    def check(self) -> None:
        super().check()
        require(self.epochs >= 1, "epochs", "must be at least 1", self.epochs)
        if self.warmup_epochs is not None:
            require(self.warmup_epochs >= 0, "warmup_epochs", "must be 0 or more", self.warmup_epochs)
        require(self.warmup_lr >= 0, "warmup_lr", "must be 0 or more", self.warmup_lr)
        if self.mix_block_min_lr is not None:
            require(self.mix_block_min_lr >= 0, "mix_block_min_lr", "must be 0 or more", self.mix_block_min_lr)
        require(self.sched != "step" or self.decay_epochs is not None, "decay_epochs",
                "is needed with --sched step (the epochs between decays)", None)
        if self.decay_epochs is not None:
            require(self.decay_epochs > 0, "decay_epochs", "must be a positive number of epochs", self.decay_epochs)
        require(self.sched != "multistep" or bool(self.decay_milestones), "decay_milestones",
                "is needed with --sched multistep (the epochs to decay at)", None)
        if self.decay_milestones:
            require(all(m > 0 for m in self.decay_milestones), "decay_milestones", "must be positive epochs",
                    self.decay_milestones)
        require(0 < self.decay_rate <= 1, "decay_rate", "must be in (0, 1]", self.decay_rate)


@dataclass
class RunOptions(Section):
    """How a run is carried out: device, precision, determinism, seed, the run folder, resuming,
    checkpoints, logging and evaluation."""

    device: str = option("auto", "where to train; auto: CUDA when available", choices=DEVICES, resumable=True)
    amp: bool | None = option(None, "mixed precision; none: on with CUDA")
    amp_dtype: str = option("bfloat16", "mixed-precision dtype (float16 adds a GradScaler)", choices=AMP_DTYPES)
    channels_last: bool | None = option(None, "channels-last memory format; none: on with CUDA")
    torchcompile: bool | str = option(
        False, "torch.compile with this backend (the bare flag or true: inductor; false, no or off: not compiled) "
        "what --torchcompile-scope names; the "
        "first steps are slower while it compiles", const=("inductor", "BACKEND"), resumable=True)
    torchcompile_mode: str | None = option(
        None, "torch.compile mode of the inductor backend; none: torch's default", choices=TORCHCOMPILE_MODES,
        resumable=True)
    torchcompile_scope: str = option(
        "encoders", "what --torchcompile compiles: encoders (the model and AutoMix's momentum encoder, each on its "
        "own; evaluation runs compiled too) or step (AutoMix's whole loss step, Mix Block included, one graph per "
        "kind of step (with and without the Mix Block branch); evaluation runs eager); vanilla, mixup and cutmix "
        "have no step graph: step compiles their model as encoders does", choices=TORCHCOMPILE_SCOPES, resumable=True)
    cuda_graph: bool = option(
        False, "run each step from static device buffers, captured once per kind of step as CUDA graphs and "
        "replayed (every --mix, also under torchrun with the all-reduce captured and with --torchcompile in a mode "
        "without CUDA graphs of its own; bfloat16, float16 (its loss scaler captured too) or no mixed precision, "
        "torch's fused SGD or AdamW); "
        "the eager step's numbers with the same optimizer (on CUDA the learning rate in float32); on a CPU the "
        "static-buffer step runs without capture", resumable=True)
    sync_bn: bool = option(False, "synchronise BatchNorm statistics across processes (torchrun)")
    deterministic: bool = option(False, "deterministic algorithms (slower)")
    max_bad_steps: int = option(
        20, "stop after this many consecutive steps with a NaN/inf loss or gradient", resumable=True)
    seed: int = option(42, "random seed (weights, lambdas, permutations, data order)")
    output: str = option("output", "parent folder of run folders", resumable=True)
    experiment: str | None = option(
        None, "run folder name under --output (a plain name, no path); none: <date>-<time>-<model>-<mix> (a new name, never a used one)",
        resumable=True)
    resume: str | None = option(
        None, "continue a run: 'auto' (the newest valid checkpoint of --experiment; none yet: a fresh start), a "
        "checkpoint file, or a run folder (path or name under --output: its newest valid checkpoint); its stored "
        "config is used, flags may change only --epochs, --workers, --log-interval and other run settings",
        resumable=True)
    allow_config_change: bool = option(
        False, "with --resume: accept flags that change what the run computes", resumable=True)
    checkpoint_hist: int = option(
        3, "epoch checkpoints to keep (the newest); last.pt and best.pt are links to them, not copies", resumable=True)
    log_interval: int = option(50, "steps between progress lines and metrics.jsonl records", resumable=True)
    # Validation is costly on a CPU.
    eval_interval: int = option(
        1, "evaluate after every N-th epoch and after the last (best.pt then compares those epochs only)",
        resumable=True)
    visualize: bool = option(True, "write mixes.png (AutoMix) at the end of training", resumable=True)
    log_tensorboard: bool = option(
        False, "also write TensorBoard event files to RUN/tensorboard/ (needs the tensorboard package)")

    def check(self) -> None:
        super().check()
        require(self.max_bad_steps >= 1, "max_bad_steps", "must be at least 1", self.max_bad_steps)
        require(self.checkpoint_hist >= 1, "checkpoint_hist", "must be at least 1", self.checkpoint_hist)
        require(self.log_interval >= 1, "log_interval", "must be at least 1", self.log_interval)
        require(self.resume != "auto" or bool(self.experiment), "experiment",
                "must name the run folder to continue with --resume auto (--experiment NAME)", self.experiment)
        require(self.eval_interval >= 1, "eval_interval", "must be at least 1", self.eval_interval)
        require(not self.experiment or plain_name(self.experiment), "experiment",
                "must be a plain folder name, the run folder under --output (no path separator, not . or ..; "
                "choose where it goes with --output)", self.experiment)
        if self.torchcompile and self.torchcompile_mode not in (None, "default"):
            require(self.torchcompile == "inductor", "torchcompile_mode",
                    f"is a mode of the inductor backend (--torchcompile {self.torchcompile} takes none)",
                    self.torchcompile_mode)
