"""Splits: by patient, else by study, with a seeded hash; benchmark holdouts kept out of train.

Every slide of one group (a patient within a study, or a whole study where patients are not
known) lands in the same split, so no patient is seen in training and evaluated on. The split
of a group is a pure function of the seed and the group's name: adding slides to a corpus
never moves the existing ones.

A holdout list (``manifests/holdout.yaml``) names slides that must never be trained on
(public benchmark slides). With ``holdout="test"`` (the default) the whole group of a held-out
slide goes to ``test``; with ``holdout="exclude"`` held-out slides are left out of the corpus.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from stcorpus.curate.errors import ManifestError, SettingsError
from stcorpus.curate.manifest import Sample

HoldoutPolicy = Literal["test", "exclude"]

HOLDOUT_FORMAT: Final = "stcorpus-holdout/1"


@dataclass(frozen=True)
class SplitSettings:
    """Split ratios (train, validation, test), the seed, and what to do with held-out slides."""

    train: float = 0.9
    validation: float = 0.05
    test: float = 0.05
    seed: int = 0
    holdout: HoldoutPolicy = "test"

    def __post_init__(self) -> None:
        ratios = (self.train, self.validation, self.test)
        if any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-9:
            raise SettingsError(f"split ratios must be >= 0 and sum to 1, got train/validation/test = {ratios}")
        if self.holdout not in ("test", "exclude"):
            raise SettingsError(f"holdout must be 'test' or 'exclude', not {self.holdout!r}")


@dataclass(frozen=True)
class Holdout:
    """One held-out slide and why."""

    slide_id: str
    reason: str


def group_of(sample: Sample) -> str:
    """The split group of a sample: its patient within its study, else its study."""
    patient = (sample.patient or "").strip()
    return f"patient:{sample.study_id}:{patient}" if patient else f"study:{sample.study_id}"


def _unit_interval(seed: int, group: str) -> float:
    digest = hashlib.sha256(f"stcorpus-split:{seed}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of_group(group: str, *, settings: SplitSettings) -> str:
    """The split a group hashes into."""
    u = _unit_interval(settings.seed, group)
    if u < settings.train:
        return "train"
    if u < settings.train + settings.validation:
        return "validation"
    return "test"


def assign_splits(
    samples: Iterable[Sample], *, settings: SplitSettings, holdouts: Mapping[str, Holdout]
) -> dict[str, str | None]:
    """Split per slide id; ``None`` for a held-out slide when ``settings.holdout == "exclude"``."""
    samples = list(samples)
    held_groups = {group_of(s) for s in samples if s.id in holdouts}
    result: dict[str, str | None] = {}
    for sample in samples:
        group = group_of(sample)
        if sample.id in holdouts and settings.holdout == "exclude":
            result[sample.id] = None
        elif group in held_groups:
            result[sample.id] = "test"
        else:
            result[sample.id] = split_of_group(group, settings=settings)
    return result


def load_holdouts(path: str | Path) -> dict[str, Holdout]:
    """Read a holdout list: ``holdout: stcorpus-holdout/1`` and ``slides: [{id, reason}, ...]``."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"{path}: cannot read holdout list: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("holdout") != HOLDOUT_FORMAT:
        raise ManifestError(f"{path}: a holdout list starts with `holdout: {HOLDOUT_FORMAT}`")
    unknown = sorted(set(raw) - {"holdout", "description", "slides"})
    if unknown:
        raise ManifestError(f"{path}: unknown key(s) {', '.join(unknown)} (valid: holdout, description, slides)")
    holdouts: dict[str, Holdout] = {}
    for i, entry in enumerate(raw.get("slides") or []):
        if not isinstance(entry, dict) or set(entry) != {"id", "reason"}:
            raise ManifestError(f"{path}: slides[{i}]: each entry needs exactly `id` and `reason`")
        slide_id, reason = str(entry["id"]), str(entry["reason"])
        if slide_id in holdouts:
            raise ManifestError(f"{path}: slides[{i}]: duplicate id {slide_id!r}")
        holdouts[slide_id] = Holdout(slide_id=slide_id, reason=reason)
    return holdouts
