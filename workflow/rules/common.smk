# Shared Python of the workflow: config validation, wildcard constraints, code hashes, targets.
import copy
import re
import sys
from pathlib import Path

# This checkout: two levels above this file, wherever the main Snakefile is. workflow.basedir is the
# directory of the *main* Snakefile, a wrapper's when kvpipe is used as a module (`module kvpipe:
# snakefile: ...`, as snakedeploy deploys workflows). None for a remote module (github(...)): then
# kvpipe must be installed, and the hashes are those of the installed package.
_HERE = workflow.current_basedir
CHECKOUT = (
    Path(_HERE.get_path_or_uri(secret_free=True)).parents[1] if _HERE.is_local else None
)
if CHECKOUT is not None:
    # Run the kvpipe of this checkout, the code whose hash the rules record.
    sys.path.insert(0, str(CHECKOUT / "src"))

import yaml

from kvpipe.config import (
    pair_settings,
    run_models,
    stage_params,
    under_defaults,
    validate,
)
from kvpipe import layout
from kvpipe.errors import KvpipeError
from kvpipe.provenance import script_hash
from kvpipe.reporting import figure_files
from kvpipe.scheduling import job_resources, on_attempt, uses_cuda
from kvpipe.shared_tokenizer import check_projection_tokenizers, source_spec
from kvpipe.stages import stages

# The analysis stages, each declared once by its kvpipe subpackage (kvpipe.stages); the helpers below build
# their rules' params and report outputs, and all_targets their targets, from these declarations.
STAGES = {s.name: s for s in stages()}

# The checkout's config.yaml under the given config, as for a run from the checkout (where Snakemake has
# merged it already, so this adds nothing): a module's configfile directive is not read, so a wrapper's
# `config: config` then needs to hold only what differs from config.yaml, like an overlay.
with open(workflow.source_path("../../config.yaml")) as _defaults:
    _merged = under_defaults(copy.deepcopy(dict(config)), yaml.safe_load(_defaults))

try:
    _validated = validate(_merged, source="config")
    # projection needs a shared tokenizer: refuse a pair without one now, not after both models were extracted
    check_projection_tokenizers(_validated)
except KvpipeError as err:
    # One line, before any job starts; a WorkflowError would add a pseudo-traceback.
    print(f"kvpipe: invalid configuration: {err}", file=sys.stderr)
    sys.exit(1)
config.clear()
config.update(_validated)
for _spec in config["models"].values():
    # a relative chat template is looked up in the working directory, then among the checkout's (config/templates/)
    _template = _spec.get("chat_template")
    if _template and not Path(_template).is_absolute() and not Path(_template).exists():
        if CHECKOUT is not None and (CHECKOUT / _template).exists():
            _spec["chat_template"] = str(CHECKOUT / _template)


RUN_PAIRS = config["run"][
    "pairs"
]  # the pairs a run builds, and their models (the cross-pair summary's inputs)
RUN_MODELS = run_models(config)


def _alternatives(names):
    return "|".join(re.escape(n) for n in sorted(names))


wildcard_constraints:
    model=_alternatives(config["models"]),
    dataset=_alternatives(config["datasets"]),
    pair=_alternatives(config["pairs"]),


def code(script, *modules):
    """Hash of a workflow script and of every kvpipe module it imports, directly or transitively, or that
    importing modules runs (the stage modules a stage's script runs through kvpipe.stages).
    """
    return script_hash(
        Path(workflow.source_path(f"../scripts/{script}")), modules=modules
    )


def pair_model(pair, role):
    return config["pairs"][pair][role]


def pair_models(pair):
    return [pair_model(pair, "scout"), pair_model(pair, "main")]


def job_model(wc):
    """The models a per-model job holds: its own."""
    return [wc.model]


def job_pair_models(wc):
    """The models a pair job holds: the pair's scout and main."""
    return pair_models(wc.pair)


def job_resource(key, models, chunked=False):
    """Resource function: mem_mb or runtime of a job holding models(wildcards), from their sizes
    (kvpipe.scheduling; the config's `resources` section); mem_mb grows with Snakemake's attempt on a retry,
    and a chunk job's runtime with the samples of its chunk.
    """

    def resource(wc, attempt):
        samples = None
        if chunked:
            first, end = chunk_samples(wc.chunk)  # chunks.smk
            samples = end - first
        return job_resources(config, models(wc), attempt, samples)[key]

    return resource


def retry_mem_mb(mem_mb):
    """Resource function: a fixed mem_mb that grows with Snakemake's attempt on a retry, as model jobs' do."""
    return lambda wc, attempt: on_attempt(mem_mb, attempt)


# GPUs of a job that runs a model: 1 when it runs on CUDA (device cuda, or auto on a machine with
# CUDA), so that `--resources gpu=G` bounds the GPU jobs running at once.
MODEL_GPUS = 1 if uses_cuda(config["device"]) else 0

# The conda environment of all rules, for --sdm conda; PyTorch's CUDA build where model jobs run on a GPU.
CONDA_ENV = "../../envs/kvpipe-cuda.yaml" if MODEL_GPUS else "../../envs/kvpipe.yaml"


def rule_threads(rule):
    """Threads of a rule's jobs (torch's too): resources.threads.<rule>, else every core the run may use.

    Read from the settings, not workflow.cores, which raises where no --cores is given: a run that
    executes nothing (--report, --rulegraph, --dag, --lint) then gets 1, as Snakemake's default.
    """
    cores = workflow.resource_settings.cores
    return config["resources"]["threads"].get(rule, cores if cores is not None else 1)


# ---- A stage's rules, from its declaration (kvpipe.stages.Stage): its rule file `workflow/rules/{stage}.smk`
# holds the compute rule `{stage}` (its inputs named as the stage's, outputs under results/{stage}/{dataset}/{pair}/,
# `params: **compute_params("{stage}")`, the script stage_compute.py) and the report rule `{stage}_report`
# (`input: report_inputs("{stage}")`, `output: **report_outputs("{stage}")`, `params: **report_params("{stage}")`,
# the script stage_report.py), and registers its final output with stage_target.


def stage_dir(stage):
    """The output directory pattern of a stage's jobs (kvpipe.layout, the one place the results layout is written)."""
    return layout.stage_dir(stage, "{dataset}", "{pair}").as_posix()


def stage_timing_files(stage):
    """A stage's measured seconds, apart so that its other outputs are byte-identical between runs."""
    return [f"{stage_dir(stage)}/{n}" for n in STAGES[stage].timing]


def stage_settings(stage):
    """Param function: what a stage's jobs read of the config for the job's pair (kvpipe.config.stage_params:
    a change reruns them)."""
    return lambda wc: stage_params(config, STAGES[stage], wc.pair)


def compute_params(stage):
    """Params of a stage's compute rule: the stage, what it reads of the config for the job's pair
    (kvpipe.config.stage_params: a change reruns it) and the code it runs."""
    return {
        "stage": stage,
        "settings": stage_settings(stage),
        "code": code("stage_compute.py", f"kvpipe.{stage}.stage"),
    }


def report_params(stage):
    """Params of a stage's report rule: the stage, the verdicts section if its report words comparisons, its code."""
    verdicts = {"verdicts": config["verdicts"]} if STAGES[stage].verdicts else {}
    return {
        "stage": stage,
        **verdicts,
        "code": code("stage_report.py", f"kvpipe.{stage}.report"),
    }


def report_inputs(stage):
    """The tables (and timing files) a stage's report reads."""
    return [
        f"{stage_dir(stage)}/{n}" for n in STAGES[stage].tables
    ] + stage_timing_files(stage)


def _caption(stage, name):
    """workflow/report/{stage}/{name}.rst if it exists (assumed for a remote module: none is checked there)."""
    caption = f"../report/{stage}/{name}.rst"
    if (
        CHECKOUT is None
        or (CHECKOUT / "workflow" / "report" / stage / f"{name}.rst").is_file()
    ):
        return caption
    return None


def _shown(stage, path, name):
    """path in the HTML report, under the stage and the job's pair and dataset, with its caption."""
    return report(
        path,
        caption=_caption(stage, name),
        category=stage,
        subcategory="{pair} on {dataset}",
        labels={"pair": "{pair}", "dataset": "{dataset}", "figure": name},
    )


def report_outputs(stage):
    """Outputs every report of a stage writes: its figures (PNG shown in the HTML report, PDF), summary.md and,
    if the stage measures time, timing.md, each with its HTML page, which the report shows inline (Markdown only
    as a download). Figures are named once in kvpipe.{stage}.report.FIGURES."""
    base = stage_dir(stage)
    out = {}
    for n in STAGES[stage].figures:
        png, pdf = figure_files(n)
        out |= {
            n: _shown(stage, f"{base}/figures/{png}", n),
            f"{n}_pdf": f"{base}/figures/{pdf}",
        }
    for page in ["summary"] + (["timing"] if STAGES[stage].timing else []):
        out |= {
            page: f"{base}/{page}.md",
            f"{page}_html": _shown(stage, f"{base}/{page}.html", page),
        }
    return out


def model_source_files(wc):
    """Local files a model source reads (a GGUF file or an HF directory, its chat template): inputs, so edits rerun."""
    spec = config["models"][wc.model]
    paths = [spec["path"]] if spec["source"] in ("gguf", "local") else []
    return paths + ([spec["chat_template"]] if spec.get("chat_template") else [])


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


def projection_structure_metrics(wc):
    """Input function: the structure stage's metrics, when the pair's projection layer map reads them."""
    if pair_settings(config, wc.pair, "projection")["layer_map"] != "best_cka":
        return []
    return one(rules.structure.output.metrics, dataset=wc.dataset, pair=wc.pair)


def projection_extra_passages(wc):
    """Input function: the distill objective's extra passages file, when the pair's projection reads one."""
    extra = pair_settings(config, wc.pair, "projection")["distill"]["extra"]
    return [extra["path"]] if extra["source"] == "file" else []


# Output patterns of the final rules, as the rule files register them, of every run (TARGETS.append) or of stages
# (stage_target), which TARGET_STAGES maps to the stages they need: built when run.stages holds them all.
TARGETS = []
TARGET_STAGES = {}


def stage_target(pattern, *stages):
    """Register pattern as a target of the default run when run.stages holds every one of stages (a stage's rule
    file registers its final output so)."""
    for stage in stages:
        if stage not in STAGES:
            _stop(
                f"a rule file registers a target of {stage!r}, which no kvpipe subpackage declares as a stage"
            )
    TARGETS.append(pattern)
    TARGET_STAGES[pattern] = set(stages)


def _stop(message):
    """One line, before any job starts (as for an invalid configuration)."""
    print(f"kvpipe: {message}", file=sys.stderr)
    sys.exit(1)


def all_targets():
    """Every registered target, for the run's datasets, pairs and their models."""
    values = {
        "dataset": config["run"]["datasets"],
        "pair": config["run"]["pairs"],
        "model": run_models(config),
    }
    own = {s for needs in TARGET_STAGES.values() if len(needs) == 1 for s in needs}
    for stage in (
        set(config["run"]["stages"]) - own
    ):  # a stage whose rule file registered its target
        _stop(
            f"run.stages: {stage!r} has no rules: the Snakefile must include workflow/rules/{stage}.smk"
        )
    out = []
    for pattern in TARGETS:
        if not TARGET_STAGES.get(pattern, set()) <= set(config["run"]["stages"]):
            continue
        names = set(re.findall(r"{(\w+)}", pattern))
        out += expand(pattern, **{k: v for k, v in values.items() if k in names})
    return list(dict.fromkeys(out))
