# Shared Python of the workflow: config validation, wildcard constraints, targets, inputs.
import re
import sys
from pathlib import Path

# Run the kvpipe of this checkout, the code whose hash the rules record.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from kvpipe.config import run_models, validate
from kvpipe.errors import KvpipeError
from kvpipe.provenance import code_hash

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


def model_resources(model):
    """Scheduler hints of a job holding one model: per-model override, else the default."""
    res = dict(config["resources"]["default"])
    res.update(config["resources"]["models"].get(model, {}))
    return res


def pair_models(pair):
    return [config["pairs"][pair]["scout"], config["pairs"][pair]["main"]]


def model_gpus():
    """Model jobs ask the scheduler for a GPU when the config says the device is CUDA."""
    return 1 if config["device"] == "cuda" else 0


# Figure names (kvpipe.structure.report.FIGURES, kvpipe.selection.report.FIGURES), without importing matplotlib.
STRUCTURE_FIGURES = ("transfer_heatmap", "cka_matrices", "cosine_r2_baseline")
SELECTION_FIGURES = ("f1_vs_retention", "overlap")


def model_card(model):
    return f"results/models/{model}/kvpipe_model.json"


def kv_manifest(dataset, model):
    return f"results/kv/{dataset}/{model}/manifest.json"


def all_targets():
    """KV datasets of every model of the selected pairs, and each pair's two analyses, on every selected dataset."""
    datasets = config["run"]["datasets"]
    return [kv_manifest(d, m) for d in datasets for m in run_models(config)] + [
        f"results/{stage}/{d}/{p}/summary.md"
        for stage in ("structure", "selection")
        for d in datasets
        for p in config["run"]["pairs"]
    ]
