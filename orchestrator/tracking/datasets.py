"""A run's dataset as MLflow dataset inputs (the UI's Dataset column): one per split, from ``meta.json``.

Name ``<data.name>-train`` / ``<data.name>-val``, digest = the first 12 hex digits of meta.json's sha256 (the same
folder gives the same digest wherever it lives; a rebuilt or different dataset changes it), source = the split's
FFRecord folder, profile = record count and classes, context ``training`` / ``validation``. Read at tracker
creation (a small file, on rank 0 only); a folder without meta.json yields no inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("orchestrator.tracking")

SPLITS = (("train", "training"), ("val", "validation"))
# what a record holds (orchestrator/data/records.py), in MLflow's column-spec schema format
SCHEMA = {"mlflow_colspec": [{"type": "binary", "name": "image", "required": True},
                             {"type": "long", "name": "label", "required": True}]}


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    digest: str
    source: str  # a file URI
    context: str  # training | validation
    profile: str  # JSON
    source_type: str = "local"

    def entity(self):
        from mlflow.entities import Dataset

        return Dataset(name=self.name, digest=self.digest, source_type=self.source_type,
                       source=json.dumps({"uri": self.source}), schema=json.dumps(SCHEMA), profile=self.profile)


def dataset_inputs(root: str | Path, name: str = "") -> list[DatasetInfo]:
    """The dataset inputs of the dataset folder ``root`` (empty when it has no readable meta.json)."""
    root = Path(root)
    meta_path = root / "meta.json"
    try:
        raw = meta_path.read_bytes()
        meta: dict[str, Any] = json.loads(raw)
    except (OSError, ValueError) as exc:
        log.debug("no dataset input: %s: %s", meta_path, exc)
        return []
    if not isinstance(meta, dict):
        return []
    digest = hashlib.sha256(raw).hexdigest()[:12]
    base = name or str(meta.get("name") or root.name)
    counts = meta.get("counts") if isinstance(meta.get("counts"), dict) else {}
    out = []
    for split, context in SPLITS:
        profile = {"num_records": counts.get(split), "num_classes": meta.get("num_classes"),
                   "payload": meta.get("payload")}
        out.append(DatasetInfo(name=f"{base}-{split}", digest=digest,
                               source=(root / f"{split}.ffr").resolve().as_uri(), context=context,
                               profile=json.dumps({k: v for k, v in profile.items() if v is not None})))
    return out
