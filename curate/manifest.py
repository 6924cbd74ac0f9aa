"""Manifests: which slides a corpus is built from, where their files are, and what they are.

A manifest is a YAML file::

    manifest: stcorpus-manifest/1
    name: demo
    allow_local: true          # local paths / file:// sources are allowed in this manifest
    defaults:                  # inherited by every sample of every study
      source: 10x
      technology: spaceranger
    studies:
      - id: scanpy-visium-fixtures
        title: Space Ranger 1.0 subsets used by scanpy's tests
        defaults:              # inherited by the samples of this study (over the manifest's)
          species: human
          licence: CC-BY-4.0
        samples:
          - id: V1_Human_Heart_subset
            organ: heart
            sources:
              matrix: ../tests/data/heart/filtered_feature_bc_matrix.h5
              positions: {url: https://example.org/tissue_positions.csv, sha256: 3f...}

A sample's value wins over its study's defaults, which win over the manifest's defaults;
``sources`` and ``reader`` options merge key by key. Unknown keys, missing required fields,
duplicate ids and unsupported URL schemes are errors naming the file, the entry and the field.
Loading a manifest never touches the network.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from stcorpus.curate.errors import ManifestError
from stcorpus.schema import SLIDE_ID_PATTERN
from stcorpus.settings import SettingsModel, format_validation_error, load_yaml

MANIFEST_FORMAT: Final = "stcorpus-manifest/1"

#: Reader keys: each has a reader in ``curate.readers.READERS`` (spatialdata needs the extra
#: ``stcorpus[spatialdata]``).
TECHNOLOGIES: Final = ("spaceranger", "hest", "stimage", "visium-hd", "xenium", "st", "spatialdata")
Technology = Literal["spaceranger", "hest", "stimage", "visium-hd", "xenium", "st", "spatialdata"]

#: Measurement platforms (what the slide was measured with, whatever format it comes in).
ASSAYS: Final = ("visium", "visium-cytassist", "visium-hd", "xenium", "st")
Assay = Literal["visium", "visium-cytassist", "visium-hd", "xenium", "st"]
DEFAULT_ASSAY: Final[Mapping[str, str]] = {
    "spaceranger": "visium",
    "visium-hd": "visium-hd",
    "xenium": "xenium",
    "st": "st",
}

#: Species names manifests may use. Gene vocabularies exist for ``SUPPORTED_SPECIES`` only;
#: the others can be listed (catalogues hold them) but are quarantined by builds.
SPECIES: Final = ("human", "mouse", "rat", "pig", "zebrafish", "frog", "axolotl", "plant", "human+mouse")
SUPPORTED_SPECIES: Final = ("human", "mouse")
Species = Literal["human", "mouse", "rat", "pig", "zebrafish", "frog", "axolotl", "plant", "human+mouse"]

CountsKind = Literal["raw", "normalized"]

#: Licence ids: SPDX ids met in the sources, or ``LicenseRef-<name>`` for anything else
#: (``LicenseRef-unknown`` where the source states none).
KNOWN_LICENCES: Final = (
    "CC0-1.0",
    "CC-BY-3.0",
    "CC-BY-4.0",
    "CC-BY-SA-4.0",
    "CC-BY-NC-3.0",
    "CC-BY-NC-4.0",
    "CC-BY-NC-SA-4.0",
    "CC-BY-NC-ND-4.0",
    "CC-BY-ND-4.0",
    "ODC-By-1.0",
    "PDDL-1.0",
    "MIT",
    "Apache-2.0",
    "BSD-3-Clause",
    "Artistic-2.0",
    "GPL-3.0-only",
    "GPL-3.0-or-later",
)
_LICENCE_REF: Final = re.compile(r"^LicenseRef-[A-Za-z0-9.\-]+$")

#: URL schemes the fetch layer handles; anything else is refused when the manifest is read.
REMOTE_SCHEMES: Final = ("https", "http", "hf", "s3", "gs", "gcs", "az", "abfs", "abfss")
LOCAL_SCHEMES: Final = ("file",)
_SCHEME: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_SHA256: Final = re.compile(r"^[0-9a-f]{64}$")
_SOURCE_NAME: Final = re.compile(r"^[a-z][a-z0-9_]*$")
#: The um/px a manifest's `mpp` and `reference_mpp` may state: finer than any light microscope or coarser than a
#: thumbnail of a whole slide is a typo (a value in nm, or mm).
MPP_RANGE: Final = (0.01, 1000.0)
#: The largest manifest file read (the shipped catalogues of every HEST-1k and STimage-1K4M slide are < 0.5 MiB).
MAX_MANIFEST_BYTES: Final = 64 * 2**20
#: The longest slide id: ids name the build's work folders and files (255 bytes at most on most file systems).
MAX_ID_LENGTH: Final = 160

ReaderOption = str | int | float | bool


class _Strict(SettingsModel):
    model_config = ConfigDict(str_strip_whitespace=True)


class Source(_Strict):
    """One named file (or archive, or folder) a sample is read from."""

    url: str = Field(
        description="https://, http://, hf://datasets/<repo>[@<rev>]/<path>, s3://, gs://, az://, file:// or a path"
    )
    sha256: str | None = Field(default=None, description="expected sha256 (hex); recorded by `curate fetch`")
    size: int | None = Field(default=None, ge=0, description="expected size in bytes")
    unpack: bool | None = Field(
        default=None, description="unpack as an archive (default: by extension .tar.gz/.tgz/.tar/.zip)"
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        if not url:
            raise ValueError("empty url")
        match = _SCHEME.match(url)
        if match:
            scheme = match.group(1).lower()
            if scheme not in REMOTE_SCHEMES + LOCAL_SCHEMES:
                supported = ", ".join(f"{s}://" for s in REMOTE_SCHEMES + LOCAL_SCHEMES)
                raise ValueError(
                    f"unsupported URL scheme {scheme}:// in {url!r}; supported: {supported} and local paths"
                )
            if scheme == "hf" and not re.match(r"^hf://datasets/[^/]+/[^/]+/.+", url):
                raise ValueError(
                    f"{url!r} is not an hf:// dataset file URL: write hf://datasets/<org>/<name>/<path> "
                    "(optionally <name>@<revision>)"
                )
        return url

    @field_validator("sha256")
    @classmethod
    def _check_sha256(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.lower()
        if not _SHA256.match(value):
            raise ValueError(f"sha256 must be 64 hexadecimal characters, not {value!r}")
        return value

    @property
    def is_local(self) -> bool:
        """True for a plain path or a file:// URL."""
        match = _SCHEME.match(self.url)
        return match is None or match.group(1).lower() == "file"


def _coerce_source(value: Any) -> Any:
    return {"url": value} if isinstance(value, str) else value


class SampleFields(_Strict):
    """Everything a sample can say about itself; every field can also be a default."""

    source: str | None = Field(default=None, description="where the slide comes from: hest, stimage, 10x, geo...")
    source_id: str | None = Field(default=None, description="the slide's id at its source (default: id)")
    technology: Technology | None = Field(default=None, description="reader key: " + ", ".join(TECHNOLOGIES))
    assay: Assay | None = Field(default=None, description="platform: " + ", ".join(ASSAYS))
    chemistry: str | None = None
    species: Species | None = None
    organ: str | None = None
    disease_state: str | None = None
    oncotree_code: str | None = None
    patient: str | None = None
    split: Literal["train", "validation", "test"] | None = Field(
        default=None,
        description="pins the slide's split (train, validation or test) instead of the seeded hash of its "
        "patient/study; every slide of one patient must be pinned alike",
    )
    reference_mpp: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="um/px a reference gives (e.g. HEST's pixel_size_um_estimated); the build summary "
        "prints the um/px the build used against it and flags a difference over 2%",
    )
    preservation: str | None = None
    licence: str | None = Field(default=None, description="SPDX id, or LicenseRef-<name>")
    distribution_licence: str | None = Field(
        default=None,
        description="licence of the distribution the files come from when it adds terms (e.g. HEST-1k's "
        "CC-BY-NC-SA-4.0 over each study's own licence)",
    )
    citation: str | None = Field(default=None, description="DOI or PMID of the source study")
    mpp: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="um/px of the full-resolution image (override)",
    )
    counts: CountsKind | None = Field(default=None, description="raw (default) or normalized")
    spots: int | None = Field(default=None, ge=0, description="spots under tissue per the source (for plans)")
    image_size: tuple[int, int] | None = Field(
        default=None, description="[width, height] of the full-resolution image per the source (for plans)"
    )
    sources: dict[str, Source] | None = None
    reader: dict[str, ReaderOption] | None = Field(default=None, description="reader options (per technology)")

    @field_validator("mpp", "reference_mpp", mode="before")
    @classmethod
    def _no_bool_scale(cls, value: Any) -> Any:
        if isinstance(value, bool):  # pydantic would read `true` as 1.0 um/px
            raise ValueError(f"expected a number of um/px, not {value}")
        return value

    @field_validator("mpp", "reference_mpp")
    @classmethod
    def _plausible_scale(cls, value: float | None) -> float | None:
        # An absurd scale does not fail where it is written: it collapses the spot lattice or the tiles
        # far downstream, under a reason that points elsewhere.
        if value is not None and not MPP_RANGE[0] <= value <= MPP_RANGE[1]:
            raise ValueError(
                f"{value:g} um/px is not the scale of a microscope image (expected {MPP_RANGE[0]:g}..{MPP_RANGE[1]:g}; "
                "a 40x scan is about 0.25, a 10x one about 1)"
            )
        return value

    @field_validator("sources", mode="before")
    @classmethod
    def _coerce_sources(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {name: _coerce_source(src) for name, src in value.items()}
        return value

    @field_validator("sources")
    @classmethod
    def _check_source_names(cls, value: dict[str, Source] | None) -> dict[str, Source] | None:
        for name in value or {}:
            if not _SOURCE_NAME.match(name):
                raise ValueError(f"source name {name!r} must be lower-case letters, digits and '_'")
        return value

    @field_validator("licence", "distribution_licence")
    @classmethod
    def _check_licence(cls, value: str | None) -> str | None:
        if value is None or value in KNOWN_LICENCES or _LICENCE_REF.match(value):
            return value
        raise ValueError(
            f"licence {value!r} is not an SPDX id this project knows ({', '.join(KNOWN_LICENCES)}); "
            "use LicenseRef-<name> for anything else, LicenseRef-unknown where none is stated"
        )


class SampleEntry(SampleFields):
    """A sample as written in a manifest."""

    id: str = Field(description="slide id, unique across all manifests of a build")

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not SLIDE_ID_PATTERN.match(value):
            raise ValueError(
                f"id {value!r} is not allowed: use letters, digits, '-' and single '_' "
                "(no '.', '/', spaces or '__'), starting with a letter or digit"
            )
        if len(value) > MAX_ID_LENGTH:  # ids name folders and files of the build
            raise ValueError(f"id {value[:40]!r}... is {len(value):,} characters long; at most {MAX_ID_LENGTH}")
        return value


class Study(_Strict):
    """A group of samples from one publication or release, with shared defaults."""

    id: str
    title: str | None = None
    url: str | None = None
    defaults: SampleFields = SampleFields()
    samples: list[SampleEntry]

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not SLIDE_ID_PATTERN.match(value):
            raise ValueError(f"study id {value!r} must use letters, digits, '-' and single '_'")
        return value


class ManifestFile(_Strict):
    """The top level of a manifest file."""

    manifest: Literal["stcorpus-manifest/1"]
    name: str
    description: str | None = None
    allow_local: bool = Field(default=False, description="allow local paths and file:// sources")
    mirrors: dict[str, str] = Field(
        default_factory=dict,
        description="source URL prefix -> local folder holding the same files (e.g. hf://datasets/MahmoodLab/hest/: "
        "/data/hest/); relative folders start at the manifest's folder",
    )
    defaults: SampleFields = SampleFields()
    studies: list[Study]

    @model_validator(mode="after")
    def _unique_ids(self) -> ManifestFile:
        seen: dict[str, str] = {}
        for i, study in enumerate(self.studies):
            for j, sample in enumerate(study.samples):
                here = f"studies[{i}].samples[{j}]"
                if sample.id in seen:
                    raise ValueError(f"duplicate sample id {sample.id!r} at {here} (first at {seen[sample.id]})")
                seen[sample.id] = here
        return self


# ---------------------------------------------------------------------------------------------
# Resolved samples
# ---------------------------------------------------------------------------------------------

REQUIRED_FIELDS: Final = ("source", "technology", "species", "licence")


@dataclass(frozen=True)
class Sample:
    """A sample with its defaults applied: what readers and the build see."""

    id: str
    study_id: str
    source: str
    source_id: str
    technology: str
    assay: str
    species: str
    licence: str
    counts: str
    sources: Mapping[str, Source]
    manifest: str  # the manifest's name
    manifest_path: Path  # where it was read from
    allow_local: bool
    chemistry: str | None = None
    organ: str | None = None
    disease_state: str | None = None
    oncotree_code: str | None = None
    patient: str | None = None
    split: str | None = None  # pinned by the manifest; None: the seeded hash decides
    reference_mpp: float | None = None  # a reference's um/px, printed beside the build's
    preservation: str | None = None
    citation: str | None = None
    distribution_licence: str | None = None
    mpp: float | None = None
    spots: int | None = None
    image_size: tuple[int, int] | None = None
    reader: Mapping[str, ReaderOption] = field(default_factory=dict)
    #: The manifest's ``mirrors``: source URL prefix -> absolute local folder (where the bytes come from,
    #: not what they are: not part of a unit's identity).
    mirrors: Mapping[str, Path] = field(default_factory=dict)

    @property
    def base_dir(self) -> Path:
        """The folder relative local paths in this sample are resolved against."""
        return self.manifest_path.parent

    @property
    def licences(self) -> tuple[str, ...]:
        """Every licence the sample's data is under: its own, and its distribution's when set."""
        return (self.licence,) if self.distribution_licence is None else (self.licence, self.distribution_licence)

    def describe(self) -> str:
        """Where this sample is written, for messages."""
        return f"{self.manifest_path}: sample {self.id!r} (study {self.study_id!r})"


@dataclass(frozen=True)
class Manifest:
    """A loaded manifest: its samples resolved, plus what provenance needs."""

    path: Path
    name: str
    description: str | None
    allow_local: bool
    sha256: str  # of the file's bytes, recorded in corpus.json
    samples: tuple[Sample, ...]
    studies: tuple[Study, ...]

    def sample(self, sample_id: str) -> Sample:
        """The sample with id ``sample_id``."""
        for sample in self.samples:
            if sample.id == sample_id:
                return sample
        raise KeyError(f"{self.path}: no sample {sample_id!r}")


def _merge(*layers: SampleFields) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for layer in layers:
        for name in layer.model_fields_set:
            value = getattr(layer, name)
            if value is None:
                continue
            if name in ("sources", "reader") and name in merged:
                merged[name] = {**merged[name], **value}
            else:
                merged[name] = value
    return merged


def _resolve(model: ManifestFile, path: Path, *, allow_local: bool) -> tuple[Sample, ...]:
    samples: list[Sample] = []
    mirrors = {prefix: (path.parent / Path(folder).expanduser()).absolute() for prefix, folder in model.mirrors.items()}
    for i, study in enumerate(model.studies):
        for j, entry in enumerate(study.samples):
            where = f"{path}: studies[{i}].samples[{j}] (id {entry.id!r})"
            values = _merge(model.defaults, study.defaults, entry)
            missing = [name for name in REQUIRED_FIELDS if name not in values]
            if missing:
                raise ManifestError(
                    f"{where}: missing required field{'s' if len(missing) > 1 else ''} "
                    f"{', '.join(repr(m) for m in missing)} (set it on the sample or in a study's/"
                    "the manifest's `defaults`)"
                )
            technology = values["technology"]
            assay = values.get("assay") or DEFAULT_ASSAY.get(technology)
            if assay is None:
                raise ManifestError(
                    f"{where}: field 'assay' is required for technology {technology!r} (one of {', '.join(ASSAYS)})"
                )
            sources: dict[str, Source] = values.get("sources", {})
            if not sources:
                raise ManifestError(f"{where}: no `sources`: name the files this sample is read from")
            local = sorted(name for name, src in sources.items() if src.is_local)
            if local and not allow_local:
                raise ManifestError(
                    f"{where}: field 'sources': {', '.join(local)} {'is a' if len(local) == 1 else 'are'} "
                    "local path(s), which this manifest does not allow; set `allow_local: true` at the "
                    "top of the manifest (or pass --allow-local) if that is intended"
                )
            samples.append(
                Sample(
                    id=entry.id,
                    study_id=study.id,
                    source=values["source"],
                    source_id=values.get("source_id", entry.id),
                    technology=technology,
                    assay=assay,
                    species=values["species"],
                    licence=values["licence"],
                    counts=values.get("counts", "raw"),
                    sources=sources,
                    manifest=model.name,
                    manifest_path=path,
                    allow_local=allow_local,
                    chemistry=values.get("chemistry"),
                    organ=values.get("organ"),
                    disease_state=values.get("disease_state"),
                    oncotree_code=values.get("oncotree_code"),
                    patient=values.get("patient"),
                    split=values.get("split"),
                    reference_mpp=values.get("reference_mpp"),
                    preservation=values.get("preservation"),
                    citation=values.get("citation"),
                    distribution_licence=values.get("distribution_licence"),
                    mpp=values.get("mpp"),
                    spots=values.get("spots"),
                    image_size=values.get("image_size"),
                    reader=values.get("reader", {}),
                    mirrors=mirrors,
                )
            )
    return tuple(samples)


def parse_manifest(text: str, *, path: Path, allow_local: bool = False) -> Manifest:
    """Parse manifest text read from ``path`` (used in messages and to resolve local paths).

    ``allow_local=True`` allows local sources even where the manifest does not (``--allow-local``).
    """
    raw = load_yaml(text, source=str(path), error=ManifestError)
    if not isinstance(raw, Mapping):
        raise ManifestError(f"{path}: a manifest is a YAML mapping with `manifest: {MANIFEST_FORMAT}` at the top")
    if raw.get("manifest") != MANIFEST_FORMAT:
        raise ManifestError(f"{path}: manifest must be {MANIFEST_FORMAT!r}, not {raw.get('manifest')!r}")
    try:
        model = ManifestFile.model_validate(raw)
    except ValidationError as exc:
        raise ManifestError(format_validation_error(exc, source=str(path), raw=raw, model=ManifestFile)) from None
    allowed = model.allow_local or allow_local
    samples = _resolve(model, path, allow_local=allowed)
    return Manifest(
        path=path,
        name=model.name,
        description=model.description,
        allow_local=allowed,
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        samples=samples,
        studies=tuple(model.studies),
    )


def load_manifest(path: str | Path, *, allow_local: bool = False) -> Manifest:
    """Read and validate one manifest file; nothing is downloaded.

    >>> manifest = load_manifest("manifests/demo.yaml")  # doctest: +SKIP
    >>> [s.id for s in manifest.samples]  # doctest: +SKIP
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:  # a data file named by mistake: refused before it is read into memory
            raise ManifestError(
                f"{path}: {size / 2**20:,.0f} MiB is not a manifest (manifests are YAML text; the largest shipped "
                f"ones are under 1 MiB, the limit is {MAX_MANIFEST_BYTES // 2**20} MiB): check the file named"
            )
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read manifest: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ManifestError(
            f"{path}: not UTF-8 text (byte {exc.object[exc.start : exc.start + 1]!r} at line {line}): "
            "save the manifest as UTF-8"
        ) from None
    return parse_manifest(text, path=path, allow_local=allow_local)


def load_manifests(paths: Iterable[str | Path], *, allow_local: bool = False) -> tuple[Manifest, ...]:
    """Read several manifests; a sample id used in two of them is an error naming both."""
    paths = list(paths)
    resolved = [Path(p).resolve() for p in paths]
    twice = next((p for i, p in enumerate(paths) if resolved[i] in resolved[:i]), None)
    if twice is not None:
        raise ManifestError(f"{twice}: the same manifest is given twice; name each manifest once")
    manifests = tuple(load_manifest(p, allow_local=allow_local) for p in paths)
    seen: dict[str, Path] = {}
    for manifest in manifests:
        for sample in manifest.samples:
            if sample.id in seen:
                raise ManifestError(
                    f"{manifest.path}: sample id {sample.id!r} is also used in {seen[sample.id]}; "
                    "slide ids must be unique across the manifests of a build"
                )
            seen[sample.id] = manifest.path
    return manifests
