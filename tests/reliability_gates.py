"""A test-only Lightning callback that holds a fit at chosen epochs until the test says go.

Used (by class path in a fit config) to make "stop the tracker while the fit is logging" or
"kill a worker during epoch N" happen at a known point instead of racing a timer.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import lightning.pytorch as pl


class WaitForFile(pl.Callback):
    """At the start or end of each listed epoch write ``<gate_dir>/epoch<N>.reached``, then wait for ``epoch<N>.go``.

    Each waiting process also writes ``epoch<N>.pid.<pid>`` (a test kills a DDP worker by it). A fit that finds ``epoch<N>.go`` already there (e.g. one restarted after a failure) passes at once.
    """

    def __init__(self, gate_dir: str, epochs: list[int], at: str = "end", timeout_s: float = 300.0) -> None:
        if at not in ("start", "end"):
            raise ValueError(f"at={at!r}; expected 'start' or 'end'")
        self.gate_dir = Path(gate_dir)
        self.epochs = set(epochs)
        self.at = at
        self.timeout_s = timeout_s

    def _gate(self, epoch: int) -> None:
        if epoch not in self.epochs:
            return
        self.gate_dir.mkdir(parents=True, exist_ok=True)
        (self.gate_dir / f"epoch{epoch}.pid.{os.getpid()}").touch()
        (self.gate_dir / f"epoch{epoch}.reached").touch()
        deadline = time.monotonic() + self.timeout_s
        while not (self.gate_dir / f"epoch{epoch}.go").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {self.gate_dir}/epoch{epoch}.go after {self.timeout_s}s")
            time.sleep(0.1)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at == "start":
            self._gate(trainer.current_epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at == "end":
            self._gate(trainer.current_epoch)
