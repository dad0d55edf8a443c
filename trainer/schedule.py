"""The training schedule: phases (frozen backbone, then fine-tuning) and the learning rate
of every step, warmup then cosine decay within each phase.

    phases(config) -> [Phase(start epoch, end epoch, frozen, peak learning rate), ...]
    PhasedSchedule(phases, steps_per_epoch, kind, warmup_epochs)(step) -> learning rate

Why warmup: Adam's first updates come from second-moment estimates of a handful of
gradients, and a freshly unfrozen pretrained backbone is easily knocked out of its minimum
by them; a linear ramp over the first steps of each phase lets the estimates settle. Why
cosine: the rate falls smoothly to zero by the end of the phase, so the last epochs refine
instead of bouncing around, without a step schedule's hand-picked epochs.

The rate is a function of the optimizer's step counter alone (checkpointed with it), so a
run resumed at any step, even in the middle of an epoch, continues on the same curve.
"""

from __future__ import annotations

import dataclasses
import math

import keras

from trainer.config import LR_SCHEDULES

# Without --warmup_epochs: this share of a phase's steps, at most one epoch.
DEFAULT_WARMUP_SHARE = 0.1


@dataclasses.dataclass(frozen=True)
class Phase:
    """Epochs [start, end) trained with the backbone frozen or not, at one peak rate."""

    start: int
    end: int
    frozen: bool
    learning_rate: float


def phases(config) -> list[Phase]:
    """The fine-tuning schedule of a TrainConfig: --freeze_epochs with the backbone frozen
    at --learning_rate, then the rest unfrozen (--unfreeze) at --fine_tune_learning_rate.
    Without --freeze_epochs, one phase of every epoch at --learning_rate."""
    freeze = min(config.freeze_epochs, config.epochs)
    if not freeze:
        return [Phase(0, config.epochs, False, config.learning_rate)]
    tuned = (config.fine_tune_learning_rate if config.fine_tune_learning_rate is not None
             else config.learning_rate / 10)
    return [p for p in (Phase(0, freeze, True, config.learning_rate),
                        Phase(freeze, config.epochs, False, tuned)) if p.end > p.start]


def warmup_steps(phase: Phase, steps_per_epoch: int, warmup_epochs: float | None) -> int:
    """Steps of the linear ramp at the start of `phase` (never all of it)."""
    steps = (phase.end - phase.start) * steps_per_epoch
    if warmup_epochs is None:
        wanted = min(steps_per_epoch, math.ceil(DEFAULT_WARMUP_SHARE * steps))
    else:
        wanted = round(warmup_epochs * steps_per_epoch)
    return max(0, min(wanted, steps - 1))


@keras.saving.register_keras_serializable(package="imagebeam")
class PhasedSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Learning rate of global step `step` (0-based, the optimizer's `iterations`).

    In phase p, t steps in, of n steps with w of warmup and peak rate r:
      t < w: r * (t + 1) / w;   else, cosine: r * (1 + cos(pi * (t - w) / (n - w))) / 2,
      constant: r.
    Steps past the last phase keep its last rate.
    """

    def __init__(self, phases: list[Phase] | list[dict], steps_per_epoch: int,
                 kind: str = "cosine", warmup_epochs: float | None = None):
        self.phases = [p if isinstance(p, Phase) else Phase(**p) for p in phases]
        self.steps_per_epoch, self.kind, self.warmup_epochs = steps_per_epoch, kind, warmup_epochs
        if kind not in LR_SCHEDULES:
            raise ValueError(f"learning rate schedule must be one of {LR_SCHEDULES}, got {kind!r}")
        self._starts = [p.start * steps_per_epoch for p in self.phases]
        self._lengths = [(p.end - p.start) * steps_per_epoch for p in self.phases]
        self._warmups = [warmup_steps(p, steps_per_epoch, warmup_epochs)
                         if kind == "cosine" else 0 for p in self.phases]

    def __call__(self, step):
        ops = keras.ops
        step = ops.cast(step, "float32")
        rate = ops.zeros_like(step)
        for p, phase in enumerate(self.phases):
            start, length, warmup = self._starts[p], self._lengths[p], self._warmups[p]
            t = ops.minimum(step - start, length - 1)
            ramp = phase.learning_rate * (t + 1) / max(warmup, 1)
            if self.kind == "cosine":
                decay = max(length - warmup, 1)
                after = phase.learning_rate * 0.5 * (1 + ops.cos(math.pi * (t - warmup) / decay))
            else:
                after = ops.full_like(step, phase.learning_rate)
            here = ops.where(t < warmup, ramp, after)
            # Later phases overwrite earlier ones from their first step on.
            rate = here if p == 0 else ops.where(step >= start, here, rate)
        return rate

    def get_config(self) -> dict:
        return {"phases": [dataclasses.asdict(p) for p in self.phases],
                "steps_per_epoch": self.steps_per_epoch, "kind": self.kind,
                "warmup_epochs": self.warmup_epochs}
