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


def model_resources(wildcards):
    """Scheduler hints of a model job: per-model override, else the default."""
    res = dict(config["resources"]["default"])
    res.update(config["resources"]["models"].get(wildcards.model, {}))
    return res


def model_gpus():
    """Model jobs ask the scheduler for a GPU when the config says the device is CUDA."""
    return 1 if config["device"] == "cuda" else 0


def model_card(model):
    return f"results/models/{model}/kvpipe_model.json"


def all_targets():
    """KV datasets of every model of the selected pairs on every selected dataset."""
    return [
        f"results/kv/{dataset}/{model}/manifest.json"
        for dataset in config["run"]["datasets"]
        for model in run_models(config)
    ]
