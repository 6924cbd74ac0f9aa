"""One strict-settings helper: the four kinds of settings refuse the same faults in the same words."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from stcorpus.errors import StcorpusError

MANIFEST = """\
manifest: stcorpus-manifest/1
name: t
allow_local: {allow_local}
defaults: {{source: 10x, technology: spaceranger, licence: CC-BY-4.0, species: human}}
studies:
  - id: s
    samples:
      - {{id: A1, {extra}sources: {{matrix: a.h5}}}}
"""
CLUSTER = "cluster: slurm\njobs: 1\nadaptive: {adaptive}\n{extra}options: {{cores: 2, memory: 4GB}}\n"


def error_of(load: Callable[[Path], object], path: Path, text: str) -> str:
    """The message of the error ``load`` raises on a file holding ``text``."""
    path.write_text(text)
    with pytest.raises(StcorpusError) as info:
        load(path)
    return str(info.value)


def manifest_error(tmp_path: Path, *, allow_local: str = "true", extra: str = "") -> str:
    from stcorpus.curate.manifest import load_manifest

    text = MANIFEST.format(allow_local=allow_local, extra=extra)
    return error_of(load_manifest, tmp_path / "manifest.yaml", text)


def config_error(tmp_path: Path, text: str) -> str:
    from stcorpus.training.config import load_config

    return error_of(load_config, tmp_path / "run.yaml", text)


def cluster_error(tmp_path: Path, *, adaptive: str = "false", extra: str = "") -> str:
    from stcorpus.curate.build.dask_executor import load_cluster_file

    return error_of(load_cluster_file, tmp_path / "cluster.yaml", CLUSTER.format(adaptive=adaptive, extra=extra))


def loader_error(data: dict[str, object]) -> str:
    from stcorpus.loaders import LoaderSettings

    with pytest.raises(StcorpusError) as info:
        LoaderSettings.from_dict(data)
    return str(info.value)


#: YAML text -> the value read (pydantic's lax mode took each of them for a bool; YAML 1.1 made ``no`` one).
NOT_BOOLS = {"'no'": "no", "no": "no", "'yes'": "yes", "0": 0, "1": 1}


@pytest.mark.parametrize("given", sorted(NOT_BOOLS))
def test_a_bool_is_true_or_false_in_every_settings_file(tmp_path: Path, given: str) -> None:
    shown = repr(NOT_BOOLS[given])
    assert manifest_error(tmp_path, allow_local=given) == (
        f"{tmp_path / 'manifest.yaml'}: allow_local must be true or false, not {shown}"
    )
    assert config_error(tmp_path, f"run:\n  deterministic: {given}\n") == (
        f"{tmp_path / 'run.yaml'}: run.deterministic must be true or false, not {shown}"
    )
    assert cluster_error(tmp_path, adaptive=given) == (
        f"{tmp_path / 'cluster.yaml'}: adaptive must be true or false, not {shown}"
    )
    assert loader_error({"shuffle": NOT_BOOLS[given]}) == f"shuffle must be true or false, not {shown}"


def test_a_misspelt_key_gets_a_did_you_mean_in_every_settings_file(tmp_path: Path) -> None:
    assert "unknown key(s) in studies[0] (id 's').samples[0] (id 'A1'): organn (did you mean 'organ'?); known: " in (
        manifest_error(tmp_path, extra="organn: heart, ")
    )
    assert "run.yaml: unknown key(s) in optim: weight_decy (did you mean 'weight_decay'?); known: lr, " in (
        config_error(tmp_path, "optim:\n  weight_decy: 0.1\n")
    )
    assert "cluster.yaml: unknown key(s): retires (did you mean 'retries'?); known: jobs, " in (
        cluster_error(tmp_path, extra="retires: 2\n")
    )
    assert loader_error({"genes": {"to_humann": True}}).startswith(
        "unknown key(s) in genes: to_humann (did you mean 'to_human'?); known: transform, "
    )
