"""``curate plan``: what a build would fetch and make, before anything is downloaded.

The numbers a user checks before spending two terabytes: slides, expected spots, download size
where manifests know it, breakdowns by technology, assay, species and licence, what the
licence allow-list and the holdout list take out, and duplicate candidates.

Duplicate candidates come from metadata alone (the build confirms them with a content
fingerprint of the counts): the same slide reaches us through several sources (282 STimage
slides are HEST slides; HEST holds byte-identical pairs such as TENX128/TENX155), and their
catalogue facts agree:

- ``image+spots``: the same full-resolution image size and spot counts within 2;
- ``study-pair``: the same assay, species and spot count, one-to-one between two studies of
  different sources that match this way at least twice (a spot count alone collides by chance:
  legacy ST slides have a few hundred spots; for ST the matches must also cover half the
  smaller study);
- ``citation+spots``: the same citation and spot count in different sources.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from stcorpus.curate.manifest import Sample

#: A Visium slide covered edge to edge has every spot of the array: that count says nothing.
FULL_VISIUM_ARRAY: Final = 4992


@dataclass(frozen=True)
class Candidate:
    """Two samples that are probably the same slide, and why."""

    first: str
    second: str
    rule: str
    detail: str


@dataclass
class Plan:
    """What a build of some manifests would do."""

    samples: list[Sample]
    excluded: dict[str, str] = field(default_factory=dict)  # slide id -> reason (licence, holdout)
    held_out: dict[str, str] = field(default_factory=dict)  # slide id -> reason: built into `test`
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def included(self) -> list[Sample]:
        """Samples the build would try."""
        return [s for s in self.samples if s.id not in self.excluded]

    def lines(self, *, by: Sequence[str] = ("technology", "assay", "species", "licence")) -> list[str]:
        """The plan as printable lines."""
        included = self.included
        spots_known = [s.spots for s in included if s.spots is not None]
        sizes = [src.size for s in included for src in s.sources.values()]
        known_sizes = [size for size in sizes if size is not None]
        lines = [
            f"slides: {len(self.samples):,} in the manifests, {len(included):,} to build, "
            f"{len(self.excluded):,} excluded",
            f"expected spots under tissue: {sum(spots_known):,} (known for {len(spots_known):,} of "
            f"{len(included):,} slides)",
            f"download: {sum(known_sizes) / 1e9:,.2f} GB known for {len(known_sizes):,} of {len(sizes):,} files",
        ]
        for attribute in by:
            counts = Counter(str(getattr(s, attribute) or "unknown") for s in included)
            spots: Counter[str] = Counter()
            for s in included:
                spots[str(getattr(s, attribute) or "unknown")] += s.spots or 0
            shown = ", ".join(f"{value} {n:,} ({spots[value]:,} spots)" for value, n in counts.most_common())
            lines.append(f"by {attribute}: {shown}")
        distributions = Counter(s.distribution_licence for s in included if s.distribution_licence)
        if distributions:
            lines.append(
                "distribution licences: " + ", ".join(f"{lic} {n:,}" for lic, n in distributions.most_common())
            )
        reasons = Counter(reason.split(":")[0] for reason in self.excluded.values())
        if reasons:
            lines.append("excluded: " + ", ".join(f"{r} {n:,}" for r, n in reasons.most_common()))
        if self.held_out:
            lines.append(f"held out of train (built into test): {len(self.held_out):,} slides")
        rules = Counter(c.rule for c in self.candidates)
        lines.append(
            f"duplicate candidates: {len(self.candidates):,} pairs"
            + (" (" + ", ".join(f"{rule} {n:,}" for rule, n in rules.most_common()) + ")" if rules else "")
        )
        return lines


def _organ_words(label: str | None) -> set[str]:
    import re

    synonyms = {"colon": "bowel", "colorectal": "bowel", "intestine": "bowel", "rectum": "bowel", "node": "lymph"}
    return {synonyms.get(w, w) for w in re.split(r"[^a-z]+", (label or "").lower()) if w}


def _organs_compatible(a: Sample, b: Sample) -> bool:
    first, second = _organ_words(a.organ), _organ_words(b.organ)
    return not first or not second or bool(first & second)


def duplicate_candidates(samples: Sequence[Sample], *, max_spot_diff: int = 2) -> list[Candidate]:
    """Pairs of samples whose catalogue facts say they are probably the same slide (see module docstring)."""
    found: dict[tuple[str, str], Candidate] = {}

    def add(a: Sample, b: Sample, rule: str, detail: str) -> None:
        first, second = sorted((a.id, b.id))
        found.setdefault((first, second), Candidate(first, second, rule, detail))

    by_size: dict[tuple[int, int], list[Sample]] = defaultdict(list)
    for sample in samples:
        if sample.image_size is not None and sample.spots is not None:
            by_size[(sample.image_size[0], sample.image_size[1])].append(sample)
    for (width, height), group in by_size.items():
        for a, b in itertools.combinations(group, 2):
            assert a.spots is not None and b.spots is not None
            if abs(a.spots - b.spots) <= max_spot_diff:
                add(a, b, "image+spots", f"image {width}x{height} px, spots {a.spots}/{b.spots}")

    for a, b in _study_pair_matches(samples):
        add(a, b, "study-pair", f"{a.assay}, {a.species}, {a.spots} spots; studies {a.study_id} / {b.study_id}")

    by_citation: dict[tuple[str, int], list[Sample]] = defaultdict(list)
    for sample in samples:
        if sample.citation and sample.spots:
            by_citation[(sample.citation, sample.spots)].append(sample)
    for (citation, spots), group in by_citation.items():
        for a, b in itertools.combinations(group, 2):
            same_kind = a.assay == b.assay and a.species == b.species and _organs_compatible(a, b)
            if a.source != b.source and same_kind:
                add(a, b, "citation+spots", f"{citation}, {a.species} {a.assay}, {spots} spots")
    return sorted(found.values(), key=lambda c: (RULES.index(c.rule), c.first, c.second))


#: The rules, strongest first (the order candidates are listed in).
RULES: Final = ("image+spots", "study-pair", "citation+spots")


def _study_pair_matches(
    samples: Sequence[Sample], *, min_matches: int = 2, min_st_fraction: float = 0.5
) -> Iterable[tuple[Sample, Sample]]:
    by_key: dict[tuple[str, str, int], list[Sample]] = defaultdict(list)
    for sample in samples:
        if sample.spots and sample.spots != FULL_VISIUM_ARRAY:
            by_key[(sample.assay, sample.species, sample.spots)].append(sample)
    study_size = Counter(s.study_id for s in samples)
    pairs: list[tuple[Sample, Sample]] = []
    per_slide_study: Counter[tuple[str, str]] = Counter()
    for group in by_key.values():
        for a, b in itertools.combinations(group, 2):
            if a.source == b.source or not _organs_compatible(a, b):
                continue
            pairs.append((a, b))
            per_slide_study[(a.id, b.study_id)] += 1
            per_slide_study[(b.id, a.study_id)] += 1
    one_to_one = [
        (a, b)
        for a, b in pairs
        if per_slide_study[(a.id, b.study_id)] == 1 and per_slide_study[(b.id, a.study_id)] == 1
    ]
    per_study_pair = Counter(frozenset((a.study_id, b.study_id)) for a, b in one_to_one)
    for a, b in one_to_one:
        n = per_study_pair[frozenset((a.study_id, b.study_id))]
        smaller = min(study_size[a.study_id], study_size[b.study_id])
        if n >= min_matches and (a.assay != "st" or n >= min_st_fraction * smaller):
            yield a, b


def make_plan(
    samples: Sequence[Sample],
    *,
    licences: Iterable[str] | None = None,
    holdouts: Mapping[str, str] | None = None,
    exclude_holdouts: bool = False,
) -> Plan:
    """The plan for ``samples`` under a licence allow-list and a holdout list (slide id -> reason).

    Held-out slides are built into ``test`` unless ``exclude_holdouts``.
    """
    allowed = frozenset(licences) if licences is not None else None
    plan = Plan(samples=list(samples))
    for sample in samples:
        outside = [lic for lic in sample.licences if allowed is not None and lic not in allowed]
        if outside:
            plan.excluded[sample.id] = f"licence: {', '.join(outside)}"
        elif holdouts and sample.id in holdouts:
            if exclude_holdouts:
                plan.excluded[sample.id] = f"holdout: {holdouts[sample.id]}"
            else:
                plan.held_out[sample.id] = holdouts[sample.id]
    plan.candidates = duplicate_candidates(plan.included)
    return plan
