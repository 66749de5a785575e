# Shared Python of the workflow: config validation, wildcard constraints, code hashes, targets.
import importlib
import re
import sys
from pathlib import Path

# Run the kvpipe of this checkout, the code whose hash the rules record.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from kvpipe.config import pair_settings, run_models, validate
from kvpipe.errors import KvpipeError
from kvpipe.provenance import script_hash
from kvpipe.reporting import figure_files

try:
    _validated = validate(config, source="config")
except KvpipeError as err:
    # One line, before any job starts; a WorkflowError would add a pseudo-traceback.
    print(f"kvpipe: invalid configuration: {err}", file=sys.stderr)
    sys.exit(1)
config.clear()
config.update(_validated)


def _alternatives(names):
    return "|".join(re.escape(n) for n in sorted(names))


wildcard_constraints:
    model=_alternatives(config["models"]),
    dataset=_alternatives(config["datasets"]),
    pair=_alternatives(config["pairs"]),


def code(script):
    """Hash of a workflow script and of every kvpipe module it imports, directly or transitively."""
    return script_hash(Path(workflow.basedir) / "workflow" / "scripts" / script)


def model_resources(model):
    """Scheduler hints of a job holding one model: per-model override, else the default."""
    res = dict(config["resources"]["default"])
    res.update(config["resources"]["models"].get(model, {}))
    return res


def pair_model(pair, role):
    return config["pairs"][pair][role]


def pair_models(pair):
    return [pair_model(pair, "scout"), pair_model(pair, "main")]


def model_gpus():
    """Model jobs ask the scheduler for a GPU when the config says the device is CUDA."""
    return 1 if config["device"] == "cuda" else 0


def stage_figures(stage, pdf=False):
    """Output files of a stage's figures, named once in kvpipe.<stage>.report.FIGURES.

    PNGs go into the HTML report with one caption each (workflow/report/<stage>/<name>.rst).
    """
    names = importlib.import_module(f"kvpipe.{stage}.report").FIGURES
    base = f"results/{stage}/{{dataset}}/{{pair}}/figures"
    if pdf:
        return {f"{n}_pdf": f"{base}/{figure_files(n)[1]}" for n in names}
    return {
        n: report(
            f"{base}/{figure_files(n)[0]}",
            caption=f"../report/{stage}/{n}.rst",
            category=stage,
            subcategory="{pair} on {dataset}",
            labels={"pair": "{pair}", "dataset": "{dataset}", "figure": n},
        )
        for n in names
    }


def model_source_files(wc):
    """Local files a model source reads (a GGUF file or an HF directory): inputs, so edits rerun."""
    spec = config["models"][wc.model]
    return [spec["path"]] if spec["source"] in ("gguf", "local") else []


def dataset_files(wc):
    """The dataset's local file, if it has one: an input, so editing it resamples."""
    path = config["datasets"][wc.dataset].get("path")
    return [path] if path else []


def sampling_tokenizer_card(wc):
    """The materialised model whose tokenizer counts prompt lengths (none for a hub tokenizer id).

    ancient(): re-materialising that model (new weights) does not resample; changing
    sampling.tokenizer does, through params.
    """
    slug = config["sampling"]["tokenizer"]
    if slug not in config["models"]:
        return []
    return [ancient(one(rules.materialize_model.output.card, model=slug))]


def sampling_tokenizer(wc, input):
    """A materialised model directory, or the hub tokenizer id."""
    cards = input.tokenizer
    return str(Path(cards[0]).parent) if cards else config["sampling"]["tokenizer"]


def one(pattern, **wildcards):
    """One file of another rule's output pattern, for the given wildcard values."""
    (path,) = expand(pattern, **wildcards)
    return path


def model_card(wc):
    """Input function: the materialised card of the job's model."""
    return one(rules.materialize_model.output.card, model=wc.model)


def pair_kv(role):
    """Input function: the KV manifest of the pair's scout or main model on the dataset."""
    return lambda wc: one(
        rules.extract_kv.output.manifest,
        dataset=wc.dataset,
        model=pair_model(wc.pair, role),
    )


def pair_model_card(role):
    """Input function: the materialised card of the pair's scout or main model."""
    return lambda wc: one(
        rules.materialize_model.output.card, model=pair_model(wc.pair, role)
    )


TARGETS = []  # output patterns of the stages' final rules, registered by the rule files


def all_targets():
    """Every registered target, for the run's datasets, pairs and their models."""
    values = {
        "dataset": config["run"]["datasets"],
        "pair": config["run"]["pairs"],
        "model": run_models(config),
    }
    out = []
    for pattern in TARGETS:
        names = set(re.findall(r"{(\w+)}", pattern))
        out += expand(pattern, **{k: v for k, v in values.items() if k in names})
    return list(dict.fromkeys(out))
