"""The values that travel between the predict job's steps, and the rows it writes."""

from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass(frozen=True)
class ImageFile:
    """One listed file, read: its bytes go to the model as they are."""

    uri: str
    labels: tuple[str, ...]  # true labels from the class folder or the CSV
    sha256: str  # of `data`
    data: bytes


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The model's answer for one file: a row of predictions/*.jsonl."""

    uri: str
    sha256: str
    true_labels: tuple[str, ...]
    label: str
    class_id: int
    probability: float  # of `label`
    top_k: tuple[tuple[str, float], ...]  # (label, probability), most probable first

    def to_json(self) -> str:
        return json.dumps({
            "uri": self.uri, "sha256": self.sha256, "true_labels": list(self.true_labels),
            "label": self.label, "class_id": self.class_id, "probability": self.probability,
            "top_k": [{"label": label, "probability": p} for label, p in self.top_k],
        }, sort_keys=True, ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """A file that got no prediction, and why: a row of errors/errors.jsonl."""

    uri: str
    reason: str  # unreadable, or the serving graph's refusal (not_an_image, ...), or undecodable
    detail: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, ensure_ascii=False)
