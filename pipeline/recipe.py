"""`Recipe`: the optimizer, learning-rate schedule and regularisation of a classification run.

A recipe is plain data (YAML -> dataclass); the builders below turn it into torch objects. The
defaults are the CondConv / EfficientNet reference recipe (TPU code): TF-style RMSProp (decay 0.9,
momentum 0.9, eps 1e-3), lr 0.016 per 256 images, 5 warmup epochs, x0.97 every 2.4 epochs, weight
decay 1e-5, label smoothing 0.1.

Learning rates are given per ``lr_batch_size`` (256) images and scaled linearly by the global batch
size (batch per device x devices x gradient accumulation); schedules are functions of the
fractional epoch and are stepped once per optimizer step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, List, Literal, Optional, Tuple

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "Recipe",
    "OPTIMIZERS",
    "SCHEDULES",
    "scaled_lr",
    "lr_factor",
    "param_groups",
    "build_optimizer",
    "build_scheduler",
    "lightning_optimizers",
]

OPTIMIZERS = ("rmsprop_tf", "sgd", "adamw")
SCHEDULES = ("exponential_step", "cosine", "step", "constant")

# eps when the recipe leaves it null: the reference RMSProp's 1e-3 (inside the sqrt, so it is a
# much larger damping than torch's 1e-8 outside it) and AdamW's usual 1e-8.
_DEFAULT_EPS = {"rmsprop_tf": 1e-3, "adamw": 1e-8, "sgd": 0.0}


@dataclass
class Recipe:
    """Optimizer, lr schedule and loss-side regularisation (label smoothing, mixup/cutmix).

    Dropout and stochastic depth belong to the model spec; augmentation to the data module;
    gradient clipping and precision to the Trainer (``trainer.gradient_clip_val``, ``trainer.precision``).
    """

    # -- optimizer
    optimizer: Literal["rmsprop_tf", "sgd", "adamw"] = "rmsprop_tf"
    lr: float = 0.016  # peak lr per `lr_batch_size` images
    lr_batch_size: int = 256
    momentum: float = 0.9  # rmsprop_tf and sgd
    rmsprop_decay: float = 0.9  # rmsprop_tf: moving-average decay of the squared gradient (torch's alpha)
    eps: Optional[float] = None  # null: 1e-3 for rmsprop_tf (TF style, inside the sqrt), 1e-8 for adamw
    nesterov: bool = True  # sgd
    betas: Tuple[float, float] = (0.9, 0.999)  # adamw
    weight_decay: float = 1e-5  # L2 for rmsprop_tf/sgd (as the reference), decoupled for adamw
    no_decay_norm_and_bias: bool = True  # no weight decay on norm weights and biases (incl. routing biases)
    # -- schedule (per optimizer step, as a function of the fractional epoch)
    schedule: Literal["exponential_step", "cosine", "step", "constant"] = "exponential_step"
    warmup_epochs: float = 5.0
    warmup_start_factor: float = 0.0  # lr at step 0 as a fraction of the peak (reference: 0)
    decay_rate: float = 0.97  # exponential_step: x decay_rate every decay_epochs
    decay_epochs: float = 2.4
    milestones: List[float] = field(default_factory=lambda: [30.0, 60.0, 80.0])  # step: epochs
    step_gamma: float = 0.1  # step: x step_gamma at each milestone
    min_lr_factor: float = 0.0  # cosine: final lr as a fraction of the peak
    # -- loss-side regularisation
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.0  # > 0 enables mixup (timm.data.Mixup)
    cutmix_alpha: float = 0.0  # > 0 enables cutmix
    mixup_prob: float = 1.0  # probability of mixing a batch when mixup/cutmix is on
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"recipe.optimizer={self.optimizer!r}; expected one of {list(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"recipe.schedule={self.schedule!r}; expected one of {list(SCHEDULES)}")
        if not self.lr > 0:
            raise ValueError(f"recipe.lr={self.lr!r}; expected a number > 0")
        if not self.lr_batch_size >= 1:
            raise ValueError(f"recipe.lr_batch_size={self.lr_batch_size!r}; expected an int >= 1")
        for name in ("weight_decay", "warmup_epochs", "mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"recipe.{name}={getattr(self, name)!r}; expected a number >= 0")
        for name in ("label_smoothing", "warmup_start_factor", "min_lr_factor", "mixup_prob",
                     "mixup_switch_prob", "momentum", "rmsprop_decay"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"recipe.{name}={getattr(self, name)!r}; expected a number in [0, 1]")
        if self.schedule == "exponential_step" and not self.decay_epochs > 0:
            raise ValueError(f"recipe.decay_epochs={self.decay_epochs!r}; expected a number > 0")
        self.betas = tuple(self.betas)  # YAML gives a list
        self.milestones = sorted(float(m) for m in self.milestones)

    @property
    def mixup_enabled(self) -> bool:
        """True when mixup or cutmix is on (the loss then takes soft targets)."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def scaled_lr(recipe: Recipe, global_batch_size: int) -> float:
    """Peak lr for a global batch: ``recipe.lr * global_batch_size / recipe.lr_batch_size``."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size={global_batch_size!r}; expected an int >= 1")
    return recipe.lr * global_batch_size / recipe.lr_batch_size


def lr_factor(recipe: Recipe, epoch: float, total_epochs: float) -> float:
    """The lr at fractional ``epoch`` as a fraction of the peak lr.

    Warmup rises linearly from ``warmup_start_factor`` to 1 over ``warmup_epochs``. After it:
    ``exponential_step`` is ``decay_rate ** floor(epoch / decay_epochs)`` counted from epoch 0, as
    the reference code does (so the first post-warmup lr is already decayed a little);
    ``cosine`` anneals from 1 to ``min_lr_factor`` over the epochs after warmup; ``step``
    multiplies by ``step_gamma`` at each milestone epoch passed; ``constant`` stays at 1.
    """
    if epoch < recipe.warmup_epochs:
        start = recipe.warmup_start_factor
        return start + (1.0 - start) * epoch / recipe.warmup_epochs
    if recipe.schedule == "exponential_step":
        return recipe.decay_rate ** math.floor(epoch / recipe.decay_epochs)
    if recipe.schedule == "cosine":
        span = max(total_epochs - recipe.warmup_epochs, 1e-8)
        progress = min(max((epoch - recipe.warmup_epochs) / span, 0.0), 1.0)
        cos = 0.5 * (1.0 + math.cos(math.pi * progress))
        return recipe.min_lr_factor + (1.0 - recipe.min_lr_factor) * cos
    if recipe.schedule == "step":
        passed = sum(1 for m in recipe.milestones if epoch >= m)
        return recipe.step_gamma ** passed
    return 1.0  # constant


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """Two parameter groups: with weight decay, and without it (norms, biases, routing biases).

    "Without" holds every parameter of ndim <= 1 or named ``*.bias`` (timm's rule), which covers
    BatchNorm weights/biases, conv/linear biases and the routing functions' biases; CondConv
    expert kernels (ndim 5) and routing weights keep the decay, as in the reference code.
    """
    from timm.optim import param_groups_weight_decay

    if not recipe.no_decay_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad],
                 "weight_decay": recipe.weight_decay}]
    return param_groups_weight_decay(model, weight_decay=recipe.weight_decay)


def build_optimizer(recipe: Recipe, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``model``'s trainable parameters at peak ``lr`` (already scaled)."""
    groups = param_groups(model, recipe)
    eps = recipe.eps if recipe.eps is not None else _DEFAULT_EPS[recipe.optimizer]
    if recipe.optimizer == "rmsprop_tf":
        from timm.optim import RMSpropTF

        # TF semantics: square_avg starts at 1, eps inside the sqrt, lr applied inside momentum.
        return RMSpropTF(groups, lr=lr, alpha=recipe.rmsprop_decay, eps=eps,
                         momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum,
                               nesterov=recipe.nesterov and recipe.momentum > 0,
                               weight_decay=recipe.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=recipe.betas, eps=eps, weight_decay=recipe.weight_decay)


def build_scheduler(
    recipe: Recipe, optimizer: torch.optim.Optimizer, steps_per_epoch: float, total_epochs: float
) -> LambdaLR:
    """A per-optimizer-step LambdaLR following :func:`lr_factor` (step ``s`` is epoch ``s / steps_per_epoch``)."""
    if not steps_per_epoch > 0:
        raise ValueError(f"steps_per_epoch={steps_per_epoch!r}; expected a number > 0")
    factor: Callable[[int], float] = _factor_fn(recipe, float(steps_per_epoch), float(total_epochs))
    return LambdaLR(optimizer, lr_lambda=factor)


def lightning_optimizers(
    recipe: Recipe, model: nn.Module, global_batch_size: int, steps_per_epoch: float,
    max_epochs: Optional[int], max_steps: int,
) -> dict[str, Any]:
    """What a LightningModule's ``configure_optimizers`` returns for ``recipe``: its optimizer at the
    batch-scaled lr and the per-step schedule over ``max_epochs`` (or ``max_steps`` when epochs are unset)."""
    optimizer = build_optimizer(recipe, model, scaled_lr(recipe, global_batch_size))
    total_epochs = max_epochs if max_epochs is not None and max_epochs >= 0 else max_steps / steps_per_epoch
    scheduler = build_scheduler(recipe, optimizer, steps_per_epoch, total_epochs)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def _factor_fn(recipe: Recipe, steps_per_epoch: float, total_epochs: float) -> Callable[[int], float]:
    # A plain closure, not a callable object: LambdaLR.state_dict stores callable objects' __dict__
    # in the checkpoint (which torch.load(weights_only=True) would then refuse); the schedule is
    # rebuilt from the recipe on resume and only `last_epoch` needs restoring.
    def factor(step: int) -> float:
        return lr_factor(recipe, step / steps_per_epoch, total_epochs)

    return factor
