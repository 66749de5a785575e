"""Rule materialize_model: model source -> safetensors directory."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))  # this checkout's kvpipe
from kvpipe.models.materialize import materialize
from kvpipe.workflow import rule_script

with rule_script(snakemake):
    card = materialize(snakemake.wildcards.model, snakemake.params.spec, Path(snakemake.output.card).parent)
    print(f"materialised {card['slug']}: {card['architecture']}, {card['num_layers']} layers, {card['fingerprint']}")
