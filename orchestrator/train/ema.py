"""Exponential moving average of the weights, evaluated alongside the live weights (a loop callback).

``shadow = decay * shadow + (1 - decay) * weights`` after every optimizer step (buffers, e.g. BatchNorm running
statistics, are copied). The shadow is an fp32 copy of the model, so a bf16/fp16 engine does not round the
average away. At every epoch end where the loop evaluated, the shadow is evaluated on the same validation loader
and ``ema_val_top1`` / ``ema_val_top5`` / ``ema_val_loss`` are added to that epoch's metrics (place this callback
before the tracker's so they are logged). Every rank keeps a shadow (the evaluation all-reduces counts).
The shadow is saved with every checkpoint (``CheckpointManager.track``) and restored on resume, so a resumed run
averages exactly as an uninterrupted one; a checkpoint written without it restarts the average from the resumed
weights (``reset``).
"""

from __future__ import annotations

import copy

import torch


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float, val_loader=None, cfg=None, device: str = "cpu"):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1), got {decay}")
        self.module, self.decay = module, decay
        self.val_loader, self.cfg, self.device = val_loader, cfg, device
        self.shadow = copy.deepcopy(module).float().eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average from the live weights."""
        self.shadow.load_state_dict(self.module.state_dict())  # copy_ casts to the shadow's fp32

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.shadow.load_state_dict(state["shadow"])

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow.parameters(), self.module.parameters(), strict=True):
            s.lerp_(p.detach().float(), 1.0 - self.decay)
        for s, b in zip(self.shadow.buffers(), self.module.buffers(), strict=True):
            s.copy_(b)

    def on_step_end(self, state, metrics: dict) -> None:
        self.update()

    def on_epoch_end(self, state, metrics: dict) -> None:
        if not metrics or self.val_loader is None:
            return
        from orchestrator.train.loop import evaluate

        m = evaluate(self.shadow, self.val_loader, self.cfg, self.device)  # fp32: the shadow is an fp32 copy
        self.shadow.eval()  # evaluate() leaves its model in train mode
        metrics.update({"ema_val_top1": m["val_top1"], "ema_val_top5": m["val_top5"], "ema_val_loss": m["val_loss"]})
