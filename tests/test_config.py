import json
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, SMOKE

from kvpipe.config import deep_merge, load_config, pair_sections, pair_settings, run_models, validate
from kvpipe.errors import KvpipeError


@pytest.fixture
def base() -> dict:
    return deep_merge(yaml.safe_load((REPO / "config.yaml").read_text()), yaml.safe_load(SMOKE.read_text()))


def test_default_and_overlay_configs_validate():
    cfg = load_config([REPO / "config.yaml"])
    assert run_models(cfg) == ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
    assert cfg["models"]["qwen2.5-coder-0.5b"]["sha256"].startswith("1d9614")
    assert cfg["datasets"]["synthetic"]["unanswerable_fraction"] == 0.0  # default filled in
    squad = load_config([REPO / "config.yaml", REPO / "config" / "squad_v2.yaml"])
    assert squad["run"]["datasets"] == ["squad_v2"]


def test_defaults_fill_nested_sources(base):
    cfg = validate(base)
    assert cfg["models"]["tiny-main"]["intermediate_size"] == 128
    assert cfg["extraction"]["layers"] == "all"
    del base["resources"]
    assert validate(base)["resources"] == {"default": {"mem_mb": 16000, "runtime": 120}, "models": {}, "threads": {},
                                           "scale": {"mem_mb": {"base": 2000, "per_b": 5000},
                                                     "runtime": {"base": 30, "per_b": 30}}, "runtime_samples": 16}


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c["sampling"].update(n="ten"), "sampling.n: 'ten' is not of type 'integer'"),
        (lambda c: c.update(colour="red"), "'colour' was unexpected"),
        (lambda c: c["extraction"].update(shard_sise=3), "extraction: Additional properties"),
        (lambda c: c["pairs"]["tiny"].update(main="nope"), "pairs.tiny.main: 'nope' is not a configured model"),
        (lambda c: c.update(selection={"retention": [0.5, 1.5]}), "selection.retention.1: 1.5 is greater than the maximum of 1"),
        (lambda c: c.update(selection={"retention": [0.0]}),
         "selection.retention.0: 0.0 is less than or equal to the minimum of 0"),
        (lambda c: c["models"]["tiny-main"].update(layers="two"), "models.tiny-main.layers: 'two' is not of type 'integer'"),
        (lambda c: c["models"]["tiny-main"].update(source="ftp"), "models.tiny-main: unknown source 'ftp'"),
        (lambda c: c["run"].update(pairs=["tiny", "other"]), "run.pairs.1: 'other' is not in pairs"),
        (lambda c: c["prompt"].update(user="{question} then {context}"), "prompt.user: {context} must come before"),
        (lambda c: c["models"].update({"a/b": c["models"]["tiny-main"]}), "does not match"),
        (lambda c: c["sampling"].update(tokenizer="ghost"), "sampling.tokenizer: 'ghost' is neither a configured model"),
        (lambda c: c["pairs"]["tiny"].update(selection={"retention": [2]}),
         "pairs.tiny.selection.retention.0: 2 is greater than the maximum of 1"),
        (lambda c: c["pairs"]["tiny"].update(structure={"cv_fold": 2}), "pairs.tiny.structure: Additional properties"),
        (lambda c: c["selection"].update(methods=["q2c", "h2o"]), "selection.methods.1: 'h2o' is not one of"),
    ],
)
def test_schema_errors_name_the_key(base, mutate, expected):
    mutate(base)
    with pytest.raises(KvpipeError) as info:
        validate(base)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_cli_reports_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling: {n: -3}\n")
    proc = subprocess.run([sys.executable, "-m", "kvpipe.cli", "validate", "-c", str(REPO / "config.yaml"), "-c", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "sampling.n: -3 is less than the minimum of 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(KvpipeError, match="nope.yaml: config file not found"):
        load_config([tmp_path / "nope.yaml"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [unclosed\n")
    with pytest.raises(KvpipeError, match="broken.yaml: not valid YAML at line"):
        load_config([broken])


def test_pair_settings_merge_the_pairs_overrides_over_the_global_section(base):
    base["pairs"]["tiny"]["selection"] = {"max_new_tokens": 3, "snapkv": {"window": 8}}
    base["pairs"]["other"] = {"scout": "tiny-scout", "main": "tiny-main"}
    cfg = validate(base)
    mine, other = pair_settings(cfg, "tiny", "selection"), pair_settings(cfg, "other", "selection")
    assert mine["max_new_tokens"] == 3 and other["max_new_tokens"] == cfg["selection"]["max_new_tokens"] == 4
    assert mine["snapkv"] == cfg["selection"]["snapkv"] | {"window": 8} and "preset" in mine["snapkv"]  # mappings merge
    assert mine["retention"] == other["retention"] == cfg["selection"]["retention"]
    assert pair_settings(cfg, "tiny", "structure") == cfg["structure"]
    assert pair_sections() == ("structure", "selection", "projection")


def test_a_hub_tokenizer_id_may_count_sampling_lengths(base):
    base["sampling"]["tokenizer"] = "Qwen/Qwen2.5-0.5B-Instruct"
    assert validate(base)["sampling"]["tokenizer"] == "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.mark.parametrize("cls, section, rule_extra", [
    ("StructureSettings", ("structure",), {"alignment"}),
    ("CcaSettings", ("structure", "cca"), set()),
    ("SelectionSettings", ("selection",), {"alignment"}),
    ("ProjectionSettings", ("projection",), set()),
    *[(f"{name}Settings", ("projection", name.lower()), set()) for name in ("Mlp", "Attention", "Distill", "Hybrid",
                                                                          "Chain", "Ttft", "Fused")],
    ("ExtraPassages", ("projection", "distill", "extra"), set()),
])
def test_every_settings_dataclass_has_exactly_its_sections_keys(cls, section, rule_extra):
    """A typed settings class names every key of its schema section (and the alignment key its rule adds), no other."""
    import dataclasses

    from kvpipe import settings
    from kvpipe.config import schema

    node = schema()
    for key in section:
        node = node["properties"][key]
    fields = {f.name for f in dataclasses.fields(getattr(settings, cls))}
    assert fields == set(node["properties"]) | rule_extra


def test_settings_are_built_from_the_validated_section(smoke_config):
    from kvpipe.settings import CcaSettings, StructurePool, StructureSettings, from_section

    built = from_section(StructureSettings, smoke_config["structure"])
    assert built.cka_tokens == 256 and built.cv_folds == 2 and built.alignment is None       # the smoke overlay's
    assert built.cca == CcaSettings(**smoke_config["structure"]["cca"])
    with_pool = from_section(StructureSettings, smoke_config["structure"] | {"alignment": {"pool": "max_overlap"}})
    assert with_pool.alignment == StructurePool("max_overlap")
    with pytest.raises(KeyError, match="cv_folds"):
        from_section(StructureSettings, {k: v for k, v in smoke_config["structure"].items() if k != "cv_folds"})


def test_projection_settings_serialise_as_the_section(smoke_config):
    """facts.json keeps the `projection` section as it was: the built settings give back the same JSON."""
    import dataclasses

    from kvpipe.settings import ChainSettings, ProjectionSettings, from_section

    section = smoke_config["projection"]
    built = from_section(ProjectionSettings, section)
    assert built.chain == ChainSettings(**section["chain"]) and built.max_test_samples == section["max_test_samples"]
    assert json.dumps(dataclasses.asdict(built), sort_keys=True) == json.dumps(section, sort_keys=True)


def test_a_record_read_back_keeps_its_values_and_takes_defaults_for_keys_it_lacks(smoke_config):
    """A report reads its stage's settings from facts.json: recorded values win, nested ones key by key, and a key
    the record was written without (an older record) takes the schema's default."""
    from kvpipe.config import section_defaults
    from kvpipe.settings import ProjectionSettings, SelectionSettings, recorded

    old = {k: v for k, v in smoke_config["projection"].items() if k != "fused"} | {"ci": 0.9, "ttft": {"target": 0.5}}
    back = recorded(ProjectionSettings, "projection", old)
    assert back.ci == 0.9 and back.seed == smoke_config["projection"]["seed"]
    assert back.ttft.target == 0.5 and back.ttft.link_mbps == section_defaults("projection", "ttft")["link_mbps"]
    assert back.fused.objective == section_defaults("projection", "fused")["objective"]
    sel = recorded(SelectionSettings, "selection", {"bootstrap": 7})
    assert sel.bootstrap == 7 and sel.methods == section_defaults("selection")["methods"] and sel.alignment is None


def test_the_schema_knows_exactly_the_declared_stages(base):
    from kvpipe.config import schema
    from kvpipe.stages import stages

    names = [s.name for s in stages()]
    assert names == ["structure", "selection", "projection"]   # in pipeline order, found without a central list
    props = schema()["properties"]
    assert props["run"]["properties"]["stages"]["items"]["enum"] == names
    assert validate(base)["run"]["stages"] == names   # the default: every stage
    assert pair_sections() == tuple(names)
    threaded = {rule for s in stages() for rule in s.threaded_rules}   # each stage's job rules, else its compute rule
    assert threaded == {"structure", "selection_chunk", "projection_fit", "projection_chunk"}
    assert threaded <= set(props["resources"]["properties"]["threads"]["propertyNames"]["enum"])
    assert all(props[name]["type"] == "object" for name in names)   # each stage's own section
    base["run"]["stages"] = ["structure", "keynorm"]
    with pytest.raises(KvpipeError, match=r"^config: run.stages.1: 'keynorm' is not one of \['structure', 'selection', "
                                          r"'projection'\]$"):
        validate(base)
