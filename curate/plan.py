"""Planning a build: which slides it takes, which it leaves out and why, and what it would make.

``make_plan`` is the one planning function of ``curate plan`` and ``curate build``: it validates
the manifests (``curate.validation``, the check ``curate validate`` runs), checks the filters
against the values the manifests hold, applies the filters, the licence allow-list and the holdout
list, assigns splits, and lists duplicate candidates. The build then runs the plan's slides.

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
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from stcorpus.curate.build.splits import HoldoutList, SplitSettings, assign_splits, resolve_holdout
from stcorpus.curate.errors import SettingsError
from stcorpus.curate.manifest import KNOWN_LICENCES, Manifest, Sample
from stcorpus.curate.validation import ManifestCheck, require_valid

#: A Visium slide covered edge to edge has every spot of the array: that count says nothing.
FULL_VISIUM_ARRAY: Final = 4992

_LICENCE_REF: Final = re.compile(r"^LicenseRef-[A-Za-z0-9.\-]+$")


@dataclass(frozen=True)
class Selection:
    """Which samples of the manifests a build takes (None: no restriction)."""

    technologies: frozenset[str] | None = None
    species: frozenset[str] | None = None
    organs: frozenset[str] | None = None  # compared case-insensitively
    ids: frozenset[str] | None = None
    licences: frozenset[str] | None = None  # the licence allow-list

    def matches(self, sample: Sample) -> bool:
        """True when the sample passes the technology/species/organ/id filters (not the licence list)."""
        if self.technologies is not None and sample.technology not in self.technologies:
            return False
        if self.species is not None and sample.species not in self.species:
            return False
        if self.organs is not None and (sample.organ or "").lower() not in {o.lower() for o in self.organs}:
            return False
        return self.ids is None or sample.id in self.ids

    def licence_ok(self, sample: Sample) -> bool:
        """True when every licence of the sample (its own and its distribution's) is on the allow-list."""
        return self.licences is None or all(licence in self.licences for licence in sample.licences)


def check_selection(selection: Selection, samples: Sequence[Sample]) -> None:
    """Refuse filter values that no sample of the manifests holds, and licence ids that are not SPDX ids.

    A typo in a filter would otherwise select nothing (or, in an allow-list, exclude everything)
    without a word; the error lists the valid values.
    """
    import difflib

    problems: list[str] = []
    held = {
        "--technology": ({s.technology for s in samples}, selection.technologies, False),
        "--species": ({s.species for s in samples}, selection.species, False),
        "--organ": ({(s.organ or "").lower() for s in samples if s.organ}, selection.organs, True),
    }
    for flag, (values, wanted, fold) in held.items():
        unknown = sorted(w for w in wanted or () if (w.lower() if fold else w) not in values)
        if unknown:
            problems.append(
                f"{flag} {', '.join(unknown)}: no slide of the manifests has "
                f"{'this value' if len(unknown) == 1 else 'these values'}; they hold: {', '.join(sorted(values))}"
            )
    ids = {s.id for s in samples}
    for slide_id in sorted(set(selection.ids or ()) - ids):
        close = difflib.get_close_matches(slide_id, ids, n=3)
        problems.append(
            f"--ids {slide_id}: no slide of the manifests has this id"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
        )
    bad = sorted(lic for lic in selection.licences or () if lic not in KNOWN_LICENCES and not _LICENCE_REF.match(lic))
    if bad:
        problems.append(
            f"--licence {', '.join(bad)}: not an SPDX id curate knows; valid: {', '.join(KNOWN_LICENCES)}, "
            "or LicenseRef-<name> as the manifests write it"
        )
    if problems:
        raise SettingsError("\n".join(problems))


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

    manifests: tuple[Manifest, ...]
    samples: list[Sample]  # the samples that pass the filters
    holdout: HoldoutList
    splits: dict[str, str | None] = field(default_factory=dict)  # slide id -> split (None: excluded holdout)
    excluded: dict[str, str] = field(default_factory=dict)  # slide id -> reason (licence, holdout)
    held_out: dict[str, str] = field(default_factory=dict)  # slide id -> reason: built into `test`
    checked: ManifestCheck = field(default_factory=ManifestCheck)
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def included(self) -> list[Sample]:
        """Samples the build would try."""
        return [s for s in self.samples if s.id not in self.excluded]

    @property
    def n_in_manifests(self) -> int:
        """Slides in the manifests, before any filter."""
        return sum(len(m.samples) for m in self.manifests)

    def holdout_line(self) -> str:
        """Which holdout list applied and how many of the selected slides it held out."""
        n = len(self.held_out) + sum(reason.startswith("holdout:") for reason in self.excluded.values())
        where = "" if not n else (" (built into test)" if self.held_out else " (left out)")
        return f"holdout list: {self.holdout.describe()}: {n:,} of the selected slides held out{where}"

    def lines(self, *, by: Sequence[str] = ("technology", "assay", "species", "licence")) -> list[str]:
        """The plan as printable lines."""
        included = self.included
        spots_known = [s.spots for s in included if s.spots is not None]
        sizes = [src.size for s in included for src in s.sources.values()]
        known_sizes = [size for size in sizes if size is not None]
        selected = f", {len(self.samples):,} selected" if len(self.samples) != self.n_in_manifests else ""
        lines = [
            f"slides: {self.n_in_manifests:,} in the manifests{selected}, {len(included):,} to build, "
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
        kinds = Counter(s.counts for s in included)
        if set(kinds) - {"raw"}:
            lines.append("count kinds: " + ", ".join(f"{kind} {n:,}" for kind, n in kinds.most_common()))
        distributions = Counter(s.distribution_licence for s in included if s.distribution_licence)
        if distributions:
            lines.append(
                "distribution licences: " + ", ".join(f"{lic} {n:,}" for lic, n in distributions.most_common())
            )
        reasons = Counter(reason.split(":")[0] for reason in self.excluded.values())
        if reasons:
            lines.append("excluded: " + ", ".join(f"{r} {n:,}" for r, n in reasons.most_common()))
        lines.append(self.holdout_line())
        if self.held_out:
            lines.append(f"held out of train (built into test): {len(self.held_out):,} slides")
        no_reader = self.checked.no_reader_line()
        if no_reader:
            lines.append(no_reader)
        if self.checked.missing_local:
            lines.append(
                f"local sources missing (a build fails these slides): {len(self.checked.missing_local):,}; "
                "`curate validate` lists them"
            )
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
    manifests: Sequence[Manifest],
    *,
    selection: Selection | None = None,
    splits: SplitSettings | None = None,
    holdout: HoldoutList | None = None,
    candidates: bool = True,
) -> Plan:
    """The plan of a build of ``manifests``: what ``curate plan`` prints and ``curate build`` runs.

    Validates the manifests and the filters (errors list what is wrong), applies the filters, the
    licence allow-list and the holdout list (default: the list shipped with stcorpus), assigns the
    splits, and finds duplicate candidates (``candidates=False`` skips that). Held-out slides are
    built into ``test``, or excluded with ``SplitSettings(holdout="exclude")``.
    """
    selection = selection or Selection()
    splits = splits or SplitSettings()
    holdout = holdout if holdout is not None else resolve_holdout()
    checked = require_valid(manifests, holdout=holdout.slides)
    every = [s for m in manifests for s in m.samples]
    check_selection(selection, every)
    chosen = [s for s in every if selection.matches(s)]
    if not chosen:
        raise SettingsError(
            f"no slide of the manifests ({len(every):,}) passes the filters together "
            "(--technology/--species/--organ/--ids): nothing to build"
        )
    plan = Plan(manifests=tuple(manifests), samples=chosen, holdout=holdout, checked=checked)
    plan.splits = assign_splits(chosen, settings=splits, holdouts=holdout.slides)
    allowed = selection.licences
    for sample in chosen:
        outside = [lic for lic in sample.licences if allowed is not None and lic not in allowed]
        if outside:
            plan.excluded[sample.id] = f"licence: {', '.join(outside)} is not on the allow-list"
        elif sample.id in holdout.slides:
            reason = holdout.slides[sample.id].reason
            if plan.splits[sample.id] is None:
                plan.excluded[sample.id] = f"holdout: {reason}"
            else:
                plan.held_out[sample.id] = reason
    included = {s.id for s in plan.included}
    no_reader = {tech: [i for i in ids if i in included] for tech, ids in checked.no_reader.items()}
    checked.no_reader = {tech: ids for tech, ids in no_reader.items() if ids}
    if candidates:
        plan.candidates = duplicate_candidates(plan.included)
    return plan
