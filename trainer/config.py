"""Command-line flags and Vertex AI environment variables, parsed into a frozen config.

    python -m trainer.task --data URI --model_dir URI [--epochs N] [--batch_size B]
        [--model small_cnn|mobilenet_v3_small|mobilenet_v3_large|efficientnet_b0|
                 efficientnet_v2_b0|resnet50|linear] [--weights none|imagenet|PATH]
        [--freeze_epochs N] [--unfreeze K] [--fine_tune_learning_rate LR]
        [--class_weight none|balanced] [--lr_schedule cosine|constant] [--warmup_epochs E]
        [--early_stopping PATIENCE] [--augment none|light|strong|NAME,...]
        [--checkpoint_every N]
        [--learning_rate LR] [--shuffle_buffer 64MB] [--cache none|memory|PATH]
        [--mixed_precision auto|on|off] [--jit auto|on|off] [--warm_start PATH]
        [--steps_per_execution N] [--cpu_replicas N]

Vertex AI sets AIP_MODEL_DIR (where its model upload looks for the SavedModel),
AIP_CHECKPOINT_DIR (kept across restarts of the job) and AIP_TENSORBOARD_LOG_DIR;
when set, they win over the defaults under --model_dir. Environment variables are
read here and nowhere else.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Mapping, Sequence

from pipelines.contract.command import prog

MODELS = ("small_cnn", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
          "efficientnet_v2_b0", "resnet50", "linear")
PRETRAINABLE = MODELS[1:-1]  # the Keras applications
CLASS_WEIGHTS = ("none", "balanced")
SWITCH = ("auto", "on", "off")
DEFAULT_SHUFFLE_BUFFER = "64MB"
DEFAULT_STEPS_PER_EXECUTION = 16
LR_SCHEDULES = ("cosine", "constant")
# --augment: presets, and the names a comma list may hold (trainer/augment.py builds them;
# "mix" is MixUp or CutMix, one per batch).
AUGMENT_PRESETS = {
    "none": (),
    "light": ("flip", "zoom", "rotate", "contrast", "brightness"),
    "strong": ("flip", "zoom", "rotate", "contrast", "brightness", "randaugment", "mix"),
}
AUGMENT_NAMES = ("flip", "zoom", "rotate", "contrast", "brightness", "randaugment", "mixup",
                 "cutmix", "mix")
# Measured (trainer_defaults, docs/training.md): light augmentation did not raise test
# accuracy on photos trained from scratch at 10 or 30 epochs, and cost much at 10.
DEFAULT_AUGMENT = "none"
CHECKPOINT_SECONDS = 600  # the default mid-epoch checkpoint interval, of training time
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


class UsageError(ValueError):
    """A mistake in how the command was called; its message is shown as is."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs, fixed before TensorFlow starts."""

    data: str  # a preprocess output root (local or gs://), holding manifest.json
    model_dir: str  # metrics.json; saved_model/, checkpoints/, logs/ unless Vertex says otherwise
    saved_model_dir: str
    checkpoint_dir: str
    tensorboard_dir: str
    epochs: int = 10
    batch_size: int = 64  # global: split over replicas
    model: str = "small_cnn"
    learning_rate: float = 1e-3
    shuffle_buffer_bytes: int = 64 * 10**6
    cache: str = "none"  # none | memory | a folder for tf.data's cache files
    mixed_precision: str = "auto"
    jit: str = "auto"
    seed: int = 0
    deterministic: bool = False  # fixed element order from the parallel stages (slower)
    progress: bool | None = None  # progress bar; None = only when stdout is a terminal
    warm_start: str | None = None  # an earlier run's checkpoint folder: initial weights
    # Train steps per call into the compiled train function (Keras' steps_per_execution):
    # Keras' Python work per call (callbacks, metrics, dispatch) is spread over N batches.
    steps_per_execution: int = DEFAULT_STEPS_PER_EXECUTION
    # >1: split this machine's CPU into that many logical devices and mirror the model over
    # them (MirroredStrategy), to run the multi-device path without GPUs.
    cpu_replicas: int = 1
    weights: str = "none"  # none | imagenet | a weights file of the backbone
    freeze_epochs: int = 0  # first epochs train the head only, the backbone frozen
    unfreeze: int | None = None  # after them: the top K backbone layers (None: all)
    fine_tune_learning_rate: float | None = None  # after them (None: learning_rate / 10)
    class_weight: str = "none"  # none | balanced: n / (classes * count) per train label
    lr_schedule: str = "cosine"  # cosine (warmup, then cosine decay per phase) | constant
    warmup_epochs: float | None = None  # None: a tenth of each phase, at most one epoch
    early_stopping: int = 0  # patience in epochs without a better val_loss; 0: off
    augment: tuple[str, ...] = AUGMENT_PRESETS[DEFAULT_AUGMENT]  # train batches only
    # Mid-epoch checkpoint every N train steps; None: every CHECKPOINT_SECONDS of training.
    # Every epoch end is checkpointed either way.
    checkpoint_every: int | None = None

    @property
    def pretrained(self) -> bool:
        return self.weights != "none"


def parse_bytes(text: str) -> int:
    """'64MB' -> 64000000, '256MiB' -> 268435456, '1000000' -> 1000000."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?\s*", text.lower())
    if not match:
        raise UsageError(f"--shuffle_buffer wants a size like 64MB or 256MiB, got {text!r}")
    return int(float(match[1]) * _UNITS[match[2] or ""])


def parse_augment(text: str) -> tuple[str, ...]:
    """'light' -> its names; 'flip,rotate' -> ('flip', 'rotate'); raises ValueError."""
    if text in AUGMENT_PRESETS:
        return AUGMENT_PRESETS[text]
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in AUGMENT_NAMES]
    if unknown or not names:
        raise ValueError(f"--augment {text!r}: use none, light, strong or a comma list of "
                         f"{', '.join(AUGMENT_NAMES)} (unknown: {', '.join(unknown) or 'none'})")
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("trainer.task"),
        description="Trains an image classifier on a preprocess output and exports a "
        "SavedModel that serves raw image bytes.",
    )
    parser.add_argument("--data", required=True, help="preprocess output (folder or gs://)")
    parser.add_argument("--model_dir", help="where outputs go (default: $AIP_MODEL_DIR)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=64, help="global batch size")
    parser.add_argument("--model", choices=MODELS, default="small_cnn",
                        help="linear = rescale, pool, dense: a probe of the input pipeline")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--shuffle_buffer", default=DEFAULT_SHUFFLE_BUFFER,
                        help="shuffle buffer size in bytes of records, e.g. 64MB, 256MiB "
                        f"(default {DEFAULT_SHUFFLE_BUFFER})")
    parser.add_argument("--cache", default="none",
                        help="none, memory, or a folder: cache decoded train images after "
                        "the first epoch")
    parser.add_argument("--mixed_precision", choices=SWITCH, default="auto",
                        help="mixed_float16 (auto: on a GPU)")
    parser.add_argument("--jit", choices=SWITCH, default="auto", help="XLA (auto: on a GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deterministic", action="store_true",
                        help="same batches in the same order on every run (slower input)")
    parser.add_argument("--progress", choices=SWITCH, default="auto",
                        help="progress bar (auto: when stdout is a terminal)")
    parser.add_argument("--steps_per_execution", type=int, default=DEFAULT_STEPS_PER_EXECUTION,
                        help="train steps per call into the compiled train function "
                        f"(default {DEFAULT_STEPS_PER_EXECUTION}; fewer Python round trips, "
                        "callbacks see every Nth batch)")
    parser.add_argument("--cpu_replicas", type=int, default=1,
                        help="N > 1: mirror the model over N logical CPU devices "
                        "(MirroredStrategy without GPUs: for trying and testing that path)")
    parser.add_argument("--weights", default="none", metavar="none|imagenet|PATH",
                        help="backbone weights of a Keras application: none (random, the "
                        "default), imagenet (downloaded by Keras: needs the internet) or a "
                        ".weights.h5 file of the backbone; pretrained weights bring the "
                        "application's own input scaling (docs/training.md)")
    parser.add_argument("--freeze_epochs", type=int, default=0,
                        help="train the head only, the backbone frozen, for the first N "
                        "epochs at --learning_rate; then fine-tune at "
                        "--fine_tune_learning_rate (needs --weights)")
    parser.add_argument("--unfreeze", type=int, metavar="K",
                        help="after --freeze_epochs, unfreeze only the top K backbone layers "
                        "(default: all)")
    parser.add_argument("--fine_tune_learning_rate", type=float,
                        help="learning rate after --freeze_epochs (default: --learning_rate "
                        "/ 10)")
    parser.add_argument("--class_weight", choices=CLASS_WEIGHTS, default="none",
                        help="balanced: weight each train example n / (classes * count of "
                        "its label), from the manifest's class_counts")
    parser.add_argument("--lr_schedule", choices=LR_SCHEDULES, default="cosine",
                        help="cosine (default): in each phase a linear warmup, then cosine "
                        "decay to 0; constant: the phase's rate throughout")
    parser.add_argument("--warmup_epochs", type=float,
                        help="warmup length per phase (default: a tenth of the phase, at "
                        "most one epoch)")
    parser.add_argument("--early_stopping", type=int, default=0, metavar="PATIENCE",
                        help="stop after PATIENCE epochs without a lower validation loss and "
                        "export the best epoch's weights (default 0: off, the last epoch)")
    parser.add_argument("--augment", default=DEFAULT_AUGMENT,
                        metavar="none|light|strong|NAME,...",
                        help=f"train-time augmentation (default {DEFAULT_AUGMENT}): light = "
                        f"{','.join(AUGMENT_PRESETS['light'])}; strong adds randaugment and "
                        f"mix (MixUp or CutMix); names: {','.join(AUGMENT_NAMES)}")
    parser.add_argument("--checkpoint_every", type=int, metavar="STEPS",
                        help="also checkpoint every STEPS train steps inside an epoch (default: "
                        f"every {CHECKPOINT_SECONDS // 60} minutes of training); a rerun resumes "
                        "at that step")
    parser.add_argument("--warm_start", metavar="PATH",
                        help="checkpoint folder of an earlier run with the same --model and "
                        "labels: its weights start this run (ignored when resuming)")
    return parser


def parse_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> TrainConfig:
    """Flags + Vertex AI variables -> TrainConfig. Raises UsageError."""
    environ = os.environ if environ is None else environ
    args = _parser().parse_args(list(argv))
    model_dir = (args.model_dir or environ.get("AIP_MODEL_DIR", "")).rstrip("/")
    if not model_dir:
        raise UsageError("give --model_dir (or run where AIP_MODEL_DIR is set)")
    if args.epochs < 1 or args.batch_size < 1:
        raise UsageError("--epochs and --batch_size must be at least 1")
    if args.learning_rate <= 0:
        raise UsageError("--learning_rate must be positive")
    if args.steps_per_execution < 1:
        raise UsageError("--steps_per_execution must be at least 1")
    if args.cpu_replicas < 1:
        raise UsageError("--cpu_replicas must be at least 1")
    if args.weights != "none" and args.model not in PRETRAINABLE:
        raise UsageError(f"--weights {args.weights}: only the Keras applications "
                         f"({', '.join(PRETRAINABLE)}) take pretrained weights")
    if args.freeze_epochs < 0 or (args.unfreeze is not None and args.unfreeze < 0):
        raise UsageError("--freeze_epochs and --unfreeze must not be negative")
    if args.freeze_epochs and args.weights == "none":
        raise UsageError("--freeze_epochs needs pretrained --weights: a random backbone "
                         "frozen is no feature extractor")
    if (args.unfreeze is not None or args.fine_tune_learning_rate is not None) and (
            not args.freeze_epochs):
        raise UsageError("--unfreeze and --fine_tune_learning_rate apply after "
                         "--freeze_epochs N (N at least 1)")
    if args.fine_tune_learning_rate is not None and args.fine_tune_learning_rate <= 0:
        raise UsageError("--fine_tune_learning_rate must be positive")
    if args.warmup_epochs is not None and args.warmup_epochs < 0:
        raise UsageError("--warmup_epochs must not be negative")
    if args.early_stopping < 0:
        raise UsageError("--early_stopping must not be negative")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise UsageError("--checkpoint_every must be at least 1")
    try:
        augments = parse_augment(args.augment)
    except ValueError as err:
        raise UsageError(str(err)) from err
    return TrainConfig(
        data=args.data.rstrip("/"),
        model_dir=model_dir,
        # Vertex's model upload reads the SavedModel from the root of AIP_MODEL_DIR.
        saved_model_dir=environ.get("AIP_MODEL_DIR") or f"{model_dir}/saved_model",
        checkpoint_dir=environ.get("AIP_CHECKPOINT_DIR") or f"{model_dir}/checkpoints",
        tensorboard_dir=environ.get("AIP_TENSORBOARD_LOG_DIR") or f"{model_dir}/logs",
        epochs=args.epochs,
        batch_size=args.batch_size,
        model=args.model,
        learning_rate=args.learning_rate,
        shuffle_buffer_bytes=parse_bytes(args.shuffle_buffer),
        cache=args.cache,
        mixed_precision=args.mixed_precision,
        jit=args.jit,
        seed=args.seed,
        deterministic=args.deterministic,
        progress={"auto": None, "on": True, "off": False}[args.progress],
        warm_start=args.warm_start.rstrip("/") if args.warm_start else None,
        steps_per_execution=args.steps_per_execution,
        cpu_replicas=args.cpu_replicas,
        weights=args.weights,
        freeze_epochs=args.freeze_epochs,
        unfreeze=args.unfreeze,
        fine_tune_learning_rate=args.fine_tune_learning_rate,
        class_weight=args.class_weight,
        lr_schedule=args.lr_schedule,
        warmup_epochs=args.warmup_epochs,
        early_stopping=args.early_stopping,
        augment=augments,
        checkpoint_every=args.checkpoint_every,
    )
