"""Load, validate and default the kvpipe configuration.

The JSON schema (workflow/schemas/config.schema.yaml, shipped inside the package) checks
types and unknown keys; :func:`validate` adds the cross-references the schema cannot
express. Every problem is reported as one line naming the offending key.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from kvpipe.errors import KvpipeError
from kvpipe.stages import Stage, stages

Config = dict[str, Any]


@cache
def schema() -> dict[str, Any]:
    """The configuration JSON schema, with what every stage kvpipe declares (kvpipe.stages) brings:
    its name in run.stages (and their default) and in resources.threads, and its per-pair overrides."""
    root = yaml.safe_load(resources.files("kvpipe").joinpath("config.schema.yaml").read_text())
    props = root["properties"]
    names = [s.name for s in stages()]
    for name in names:
        if name not in props:
            raise KvpipeError(f"config.schema.yaml: no section for the stage {name!r} (kvpipe.{name} declares it)")
        props["pairs"]["additionalProperties"]["properties"][name] = {
            "type": "object",
            "description": f"this pair's overrides of the global `{name}` section (merged over it, then validated)"}
    props["run"]["properties"]["stages"] |= {"items": {"enum": names}, "default": names}
    threads = props["resources"]["properties"]["threads"]["propertyNames"]
    threads["enum"] = sorted([*threads["enum"], *(rule for s in stages() for rule in s.threaded_rules)])
    return root


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Merge overlay into a copy of base; mappings merge recursively, other values replace."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def under_defaults(config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """config with what only defaults has added (mappings merge, other values of config win), in place.

    The result equals deep_merge(defaults, config), but the keys config has keep their order, so a
    config that already holds every default (a run from the checkout) is returned unchanged: the
    rules' params, which Snakemake compares by their printed form, stay as they were.
    """
    for key, value in defaults.items():
        if key not in config:
            config[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(config[key], dict):
            under_defaults(config[key], value)
    return config


def load_config(paths: Iterable[Path | str]) -> Config:
    """Read and merge YAML files in order (later ones override), then validate."""
    paths = [Path(p) for p in paths]
    merged: dict[str, Any] = {}
    for path in paths:
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise KvpipeError(f"{path}: config file not found") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise KvpipeError(f"{path}: not valid YAML{where}") from None
        if data is None:
            continue
        if not isinstance(data, dict):
            raise KvpipeError(f"{path}: top level must be a mapping")
        merged = deep_merge(merged, data)
    return validate(merged, source=" + ".join(str(p) for p in paths))


def _dotted(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _branch(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    return root["$defs"][node["$ref"].rsplit("/", 1)[-1]] if "$ref" in node else node


def _describe(error: jsonschema.ValidationError, root: dict[str, Any]) -> str:
    """A short message for a schema error; for a `source`-tagged oneOf, the error of the named branch."""
    branches = [_branch(b, root) for b in error.validator_value] if error.validator == "oneOf" else []
    sources = [b.get("properties", {}).get("source", {}).get("const") for b in branches]
    if sources and all(sources) and isinstance(error.instance, dict):
        chosen = error.instance.get("source")
        if chosen not in sources:
            known = ", ".join(s for s in sources if s)
            return f"{_dotted(error.absolute_path)}: unknown source {chosen!r} (one of: {known})"
        index = sources.index(chosen)
        inner = [e for e in error.context or [] if e.relative_schema_path and e.relative_schema_path[0] == index]
        best = jsonschema.exceptions.best_match(inner)
        if best is not None:
            return f"{_dotted(best.absolute_path)}: {best.message}"
    return f"{_dotted(error.absolute_path)}: {error.message}"


def _fill_defaults(instance: Any, node: dict[str, Any], root: dict[str, Any]) -> None:
    """Insert schema defaults into instance (which already validates against node)."""
    if "$ref" in node:
        _fill_defaults(instance, _branch(node, root), root)
        return
    if "oneOf" in node:
        for branch in node["oneOf"]:
            resolved = _branch(branch, root)
            if jsonschema.Draft202012Validator(resolved | {"$defs": root["$defs"]}).is_valid(instance):
                _fill_defaults(instance, resolved, root)
                return
        return
    if not isinstance(instance, dict):
        return
    for key, sub in node.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            _fill_defaults(instance[key], sub, root)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        for key, value in instance.items():
            if key not in node.get("properties", {}):
                _fill_defaults(value, extra, root)


def section_defaults(*path: str) -> dict[str, Any]:
    """The schema's defaults of one section, e.g. section_defaults("verdicts") or ("projection", "ttft")."""
    root = schema()
    node = root
    for key in path:
        node = _branch(node, root)["properties"][key]
    out: dict[str, Any] = {}
    _fill_defaults(out, node, root)
    return out


def _check_references(config: Config) -> None:
    models, pairs, datasets = config["models"], config["pairs"], config["datasets"]
    for name, pair in pairs.items():
        for role in ("scout", "main"):
            if pair[role] not in models:
                raise KvpipeError(
                    f"pairs.{name}.{role}: {pair[role]!r} is not a configured model "
                    f"(models: {', '.join(sorted(models))})"
                )
    for kind, known in (("pairs", pairs), ("datasets", datasets)):
        for i, name in enumerate(config["run"][kind]):
            if name not in known:
                raise KvpipeError(f"run.{kind}.{i}: {name!r} is not in {kind} ({', '.join(sorted(known))})")
    for name, spec in datasets.items():
        if spec["source"] == "squad_v2" and not (spec.get("path") or spec.get("hub_id")):
            raise KvpipeError(f"datasets.{name}: give either 'path' or 'hub_id'")
    tokenizer = config["sampling"]["tokenizer"]
    if tokenizer not in models and "/" not in tokenizer:
        raise KvpipeError(f"sampling.tokenizer: {tokenizer!r} is neither a configured model "
                          f"({', '.join(sorted(models))}) nor a hub tokenizer id (org/name)")
    size, shard = config["run"]["chunk_size"], config["extraction"]["shard_size"]
    if size % shard:
        raise KvpipeError(f"run.chunk_size: {size} is not a multiple of extraction.shard_size={shard} "
                          "(a chunk holds whole KV shards)")
    user = config["prompt"]["user"]
    if user.count("{context}") != 1 or user.count("{question}") != 1:
        raise KvpipeError("prompt.user: must contain {context} and {question} exactly once each")
    if user.index("{context}") > user.index("{question}"):
        raise KvpipeError("prompt.user: {context} must come before {question} (the context is prefilled first)")


def check_projection(cfg: dict[str, Any], where: str = "projection") -> None:
    """Cross-references of a (merged) projection section the schema cannot express."""
    if "main_full" not in cfg["conditions"]:
        raise KvpipeError(f"{where}.conditions: must include main_full (the reference of every comparison)")
    for key, known in (("projector", cfg["projectors"]), ("objective", cfg["objectives"])):
        if cfg["chain"][key] not in known:
            raise KvpipeError(f"{where}.chain.{key}: {cfg['chain'][key]!r} is not fitted ({where}.{key}s: "
                              f"{', '.join(known)})")
    hybrids = {"own_bottom_projected_top", "projected_hidden", "projected_kv_refresh"} & set(cfg["conditions"])
    for key, known in (("projector", cfg["projectors"]), ("objective", cfg["objectives"])):
        if hybrids and cfg["hybrid"][key] not in known:
            raise KvpipeError(f"{where}.hybrid.{key}: {cfg['hybrid'][key]!r} is not fitted ({where}.{key}s: "
                              f"{', '.join(known)})")
    if "fused" in cfg["conditions"] and "gated" not in cfg["projectors"]:
        raise KvpipeError(f"{where}.conditions: fused needs the gated projector ({where}.projectors)")
    extra = cfg["distill"]["extra"]
    if extra["source"] == "file" and not extra["path"]:
        raise KvpipeError(f"{where}.distill.extra.path: required with source: file")
    if "fused" in cfg["conditions"] and cfg["fused"]["objective"] not in cfg["objectives"]:
        raise KvpipeError(f"{where}.fused.objective: {cfg['fused']['objective']!r} is not fitted ({where}.objectives: "
                          f"{', '.join(cfg['objectives'])})")


def pair_sections() -> tuple[str, ...]:
    """The config sections a pair may override for itself (from the schema)."""
    pair = schema()["properties"]["pairs"]["additionalProperties"]["properties"]
    return tuple(name for name in pair if name not in ("scout", "main"))


def pair_settings(config: Config, pair: str, section: str) -> dict[str, Any]:
    """A pair's settings of one section: its own overrides merged over the global section."""
    return deep_merge(config[section], config["pairs"][pair].get(section, {}))


def stage_params(config: Config, stage: Stage, pair: str) -> dict[str, Any]:
    """What a stage's compute step reads of the config for a pair (its rule's params): its section's settings (with
    the alignment settings it reads) under its name, and the prompt, device and compute dtype if it runs the models."""
    settings = pair_settings(config, pair, stage.name)
    if stage.alignment:
        settings |= {"alignment": {key: config["alignment"][key] for key in stage.alignment}}
    models = {"prompt": config["prompt"], "device": config["device"], "dtype": config["extraction"]["dtype"]}
    return {stage.name: settings, **(models if stage.models else {})}


def _check_pair_overrides(config: Config, root: dict[str, Any]) -> None:
    for name in config["pairs"]:
        for section in pair_sections():
            merged = pair_settings(config, name, section)
            node = root["properties"][section] | {"$defs": root["$defs"]}
            error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(node).iter_errors(merged))
            if error is not None:
                raise KvpipeError(f"{_dotted(['pairs', name, section, *error.absolute_path])}: {error.message}")
        check_projection(pair_settings(config, name, "projection"), f"pairs.{name}.projection")


def validate(config: Config, source: str = "config") -> Config:
    """Validate config against the schema and cross-references; return a copy with defaults."""
    root = schema()
    validator = jsonschema.Draft202012Validator(root)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), list(map(str, e.path))))
    if errors:
        raise KvpipeError(f"{source}: {_describe(errors[0], root)}")
    config = copy.deepcopy(config)
    _fill_defaults(config, root, root)
    try:
        _check_references(config)
        check_projection(config["projection"])
        _check_pair_overrides(config, root)
    except KvpipeError as err:
        raise KvpipeError(f"{source}: {err}") from None
    return config


def run_models(config: Config) -> list[str]:
    """Model slugs used by the pairs selected in run.pairs, in first-use order."""
    slugs: list[str] = []
    for pair in config["run"]["pairs"]:
        for role in ("scout", "main"):
            slug = config["pairs"][pair][role]
            if slug not in slugs:
                slugs.append(slug)
    return slugs
