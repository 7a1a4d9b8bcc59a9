"""Checkpoints: DeepSpeed's sharded state per tag, a pointer that only ever names a complete one, top-k pruning,
and consolidated weights loadable without DeepSpeed.

Layout under ``run_dir/checkpoints``::

    step00000120/          DeepSpeed's files + rank<r>.pt (loop state, RNG) + COMPLETE
    LATEST                 the newest complete tag (written atomically, after every rank finished)
    index.json             tag -> {step, val_top1}: what top-k pruning keeps
    best.pt / final.pt     consolidated model weights (plain torch state_dict)

A crash at any moment leaves LATEST naming a complete tag: the pointer moves only after a barrier that every
rank reaches once its files are written and fsynced, and it is replaced with os.replace.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from orchestrator.errors import UserError
from orchestrator.fsutil import atomic_write, fsync_dir
from orchestrator.train import dist

log = logging.getLogger(__name__)

LOW_SPACE = 16 * 2**20  # below this after a failed save, the disk being full is the likely cause


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CheckpointManager:
    """Saves and restores training state for one run; call save/load on every rank."""

    def __init__(self, run_dir: str | Path, rank: int, keep_top_k: int = 2):
        self.dir = Path(run_dir) / "checkpoints"
        self.rank = rank
        self.keep_top_k = keep_top_k
        # objects outside the engine whose state rides along in each rank's file (e.g. the EMA shadow)
        self.extras: dict[str, Any] = {}
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()

    def track(self, name: str, obj: Any) -> None:
        """Save ``obj.state_dict()`` with every checkpoint and restore it with ``obj.load_state_dict`` on load."""
        self.extras[name] = obj

    # -- pointer and index -------------------------------------------------------------------------------------
    def latest_tag(self) -> str | None:
        """The newest complete checkpoint, or None. A pointer to an incomplete tag is never trusted."""
        p = self.dir / "LATEST"
        if not p.is_file():
            return None
        tag = p.read_text().strip()
        return tag if (self.dir / tag / "COMPLETE").is_file() else None

    def _index(self) -> dict[str, Any]:
        p = self.dir / "index.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    # -- save --------------------------------------------------------------------------------------------------
    def saved_world_size(self) -> int | None:
        """How many ranks wrote the latest complete checkpoint (None: unknown or no checkpoint)."""
        tag = self.latest_tag()
        return self._index().get(tag, {}).get("world_size") if tag else None

    def _tag_for(self, step: int) -> tuple[str, str]:
        """(the tag to write ``step`` to, its twin). A step saved again (at an epoch's end after its step-interval
        save, or at a stop) goes to ``stepN.1`` while ``stepN`` is the latest, and back: a new version never
        overwrites the one LATEST names, so a kill or a full disk mid-write leaves that one whole. Rank 0's view
        decides (ranks on another node may not see LATEST)."""
        base, alt = f"step{step:08d}", f"step{step:08d}.1"
        taken = [1 if self.rank == 0 and self.latest_tag() == base else 0]
        return (alt, base) if dist.all_reduce_host(taken, "max", torch.int32)[0] else (base, alt)

    def save(self, engine, step: int, loop_state: dict, val_top1: float | None = None) -> str:
        """Write a complete checkpoint on every rank, then move LATEST. Disk errors raise UserError, with the
        partial tag removed and the previous checkpoint untouched."""
        tag, twin = self._tag_for(step)
        if self.rank == 0:  # a stale version of this tag (not the latest: _tag_for) is never mixed with the new one
            shutil.rmtree(self.dir / tag, ignore_errors=True)
        dist.barrier()
        ok = 1
        err: Exception | None = None
        try:
            engine.save_checkpoint(str(self.dir), tag=tag, client_state={"loop": loop_state}, save_latest=False)
            rng = {"torch": torch.get_rng_state(), "loop": loop_state,
                   "extras": {name: obj.state_dict() for name, obj in self.extras.items()}}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, self.dir / tag / f"rank{self.rank}.pt")
            _fsync_tree(self.dir / tag)
        except (OSError, RuntimeError) as e:  # disk full, unwritable, or a torch.save failure
            ok, err = 0, e
        if not dist.all_reduce_host([ok], "min", torch.int32)[0]:  # every rank wrote its part, or none counts
            if self.rank == 0:
                shutil.rmtree(self.dir / tag, ignore_errors=True)
            dist.barrier()
            reason = str(err).splitlines()[0] if err else "another rank failed to write its part"
            free = shutil.disk_usage(self.dir).free
            if free < LOW_SPACE:  # torch.save reports a full disk as a bare "unexpected pos" write failure
                reason = f"no space left on device: {free // 1024} KiB free in {self.dir}; {reason}"
            raise UserError(f"checkpoint {tag} could not be written ({reason}); "
                            f"previous checkpoint {self.latest_tag()} kept")
        if self.rank == 0:
            atomic_write(self.dir / tag / "COMPLETE", b"ok\n")
            index = self._index()
            if val_top1 is None:  # the same step's weights: its score, if the version it supersedes had one
                val_top1 = index.get(twin, {}).get("val_top1")
            index[tag] = {"step": step, "val_top1": val_top1, "world_size": dist.world_size()}
            atomic_write(self.dir / "index.json", json.dumps(index, indent=1).encode())
            atomic_write(self.dir / "LATEST", f"{tag}\n".encode())
            index.pop(twin, None)  # superseded: removed by the prune below
            self._prune(index, keep=tag)
        dist.barrier()
        return tag

    def _prune(self, index: dict[str, Any], keep: str) -> None:
        """Keep the top-k tags by val top-1 plus the newest; delete the rest (rank 0 only)."""
        scored = sorted((t for t in index if index[t]["val_top1"] is not None),
                        key=lambda t: index[t]["val_top1"], reverse=True)
        keepers = set(scored[: self.keep_top_k]) | {keep}
        for tag in list(index):
            if tag not in keepers:
                index.pop(tag)
                shutil.rmtree(self.dir / tag, ignore_errors=True)
        atomic_write(self.dir / "index.json", json.dumps(index, indent=1).encode())
        for stray in self.dir.glob("step*"):  # tags from a save that crashed before COMPLETE
            if stray.name not in keepers and stray.is_dir():
                shutil.rmtree(stray, ignore_errors=True)

    # -- load --------------------------------------------------------------------------------------------------
    def load(self, engine) -> dict | None:
        """Restore the latest complete checkpoint into the engine; returns the loop state or None."""
        tag = self.latest_tag()
        if tag is None:
            return None
        engine.load_checkpoint(str(self.dir), tag=tag)
        mine = self.dir / tag / f"rank{self.rank}.pt"
        # a rank the checkpoint's run did not have: the loop state is the same on every rank; take rank 0's
        state = torch.load(mine if mine.is_file() else self.dir / tag / "rank0.pt", weights_only=False)
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        saved = state.get("extras", {})
        for name, obj in self.extras.items():
            if name in saved:
                obj.load_state_dict(saved[name])
            elif hasattr(obj, "reset"):  # enabled after this checkpoint was written: start from the resumed state
                log.warning("checkpoint %s has no %s state; it restarts from the resumed weights", tag, name)
                obj.reset()
        return state["loop"]

    # -- consolidated weights ----------------------------------------------------------------------------------
    def export_weights(self, module: torch.nn.Module, name: str, meta: dict) -> Path:
        """model weights as a plain torch file (rank 0): loadable with torch.load, no DeepSpeed needed."""
        path = self.dir / name
        state = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
                 for k, v in module.state_dict().items()}
        tmp = path.with_name(f".{name}.tmp")
        torch.save({"state_dict": state, "meta": meta}, tmp)
        os.replace(tmp, path)
        return path
