"""Stop a fit at the first NaN or infinite training loss, with a clear status instead of hours of NaNs.

`NonFiniteLossGuard` (added to every fit by the CLI conventions) checks the loss before each
backward pass. The decision is reduced over all DDP ranks (one scalar all-reduce), so every rank
stops at the same step and none waits forever in a collective. On a non-finite loss it tags the
MLflow run ``condconv.status=nan_loss`` and raises `NonFiniteLossError`; Lightning then marks the
run FAILED. `condconv fit` prints the error as one line; in a sweep the trial ends with status
``NAN_LOSS`` and is not retried (a deterministic failure would only fail again), and the sweep
goes on with the other trials.

Lightning's ``detect_anomaly`` finds the op that made the NaN but slows every step several-fold;
this check costs one comparison per step. Gradient clipping (``trainer.gradient_clip_val``) is
Lightning's own and can be set in any fit or sweep config.
"""
from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from pipeline.tracking import STATUS_TAG, set_tags

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard", "NAN_LOSS_STATUS"]

NAN_LOSS_STATUS = "nan_loss"  # the value of the STATUS_TAG on a run stopped by the guard


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite (deterministic: retrying the same config fails again)."""


class NonFiniteLossGuard(Callback):
    """Raise `NonFiniteLossError` on the first NaN/inf training loss, on every rank at the same step.

    Args:
        check_every_n_steps: check one batch in this many (on GPUs each check waits for the
            step's loss to reach the host; 1 checks every batch).
    """

    def __init__(self, check_every_n_steps: int = 1) -> None:
        if not isinstance(check_every_n_steps, int) or check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps={check_every_n_steps!r}; expected an int >= 1")
        self.check_every_n_steps = check_every_n_steps

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        """Before the backward pass (the weights are still finite): stop if any rank's loss is not finite."""
        if trainer.global_step % self.check_every_n_steps:
            return
        bad = not bool(torch.isfinite(loss.detach()).all())
        # "any": one rank's NaN stops all ranks together (a lone raise would hang the others in DDP).
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        message = (
            f"non-finite training loss ({float(loss.detach().float()):g} on this rank) at epoch "
            f"{trainer.current_epoch}, global step {trainer.global_step}, lr {lr:.3g}; lower "
            f"model.recipe.lr, set trainer.gradient_clip_val, or check the data"
        )
        set_tags(trainer.loggers, {STATUS_TAG: NAN_LOSS_STATUS, "condconv.status_detail": message})
        raise NonFiniteLossError(message)
