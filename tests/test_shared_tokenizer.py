"""The DAG-time rule that refuses projection for a pair without a shared tokenizer (kvpipe.shared_tokenizer)."""

import copy
import json

import pytest
from conftest import REPO, SMOKE

from kvpipe.config import load_config
from kvpipe.errors import KvpipeError
from kvpipe.shared_tokenizer import DIFFERENT, SAME, UNKNOWN, check_projection_tokenizers, compare, identities, pair_tokenizers

TINY = {"source": "tiny", "arch": "qwen2", "vocab_size": 512, "tokenizer_seed": 0}
PYPI = {"source": "pypi", "packages": ["p==1"], "member": "*", "sha256": "0" * 64}


def verdict(a: dict, b: dict, root=REPO / "no-results") -> str:
    return compare(identities("a", a, root), identities("b", b, root))[0]


@pytest.mark.parametrize("a, b, expected", [
    (TINY, TINY | {"arch": "llama"}, SAME),               # qwen2 and llama tiny models train one tokenizer
    (TINY, TINY | {"tokenizer_seed": 7}, DIFFERENT),
    (TINY, TINY | {"arch": "gemma3"}, DIFFERENT),          # Gemma's special tokens
    ({"source": "hf", "id": "Q/a", "revision": "r"}, {"source": "hf", "id": "Q/a", "revision": "r"}, SAME),
    ({"source": "hf", "id": "Q/a-3B"}, {"source": "hf", "id": "Q/a-7B"}, UNKNOWN),   # may share one: say so
    ({"source": "hf", "id": "Q/a-3B", "tokenizer": "q"}, {"source": "hf", "id": "Q/a-7B", "tokenizer": "q"}, SAME),
    (PYPI, PYPI, UNKNOWN),
    (PYPI | {"tokenizer": "qwen2.5"}, PYPI | {"tokenizer": "qwen2.5"}, SAME),
    (PYPI | {"tokenizer": "qwen2.5"}, PYPI | {"tokenizer": "smollm2"}, DIFFERENT),
    (PYPI | {"tokenizer": "qwen2.5"}, TINY, UNKNOWN),
])
def test_the_config_decides_when_nothing_is_materialised(a, b, expected):
    assert verdict(a, b) == expected


def test_materialised_tokenizer_files_win_over_declared_names(tmp_path):
    for slug, vocab in (("a", "x"), ("b", "y")):
        (tmp_path / slug).mkdir()
        (tmp_path / slug / "tokenizer.json").write_text(json.dumps({"vocab": vocab}))
    declared = PYPI | {"tokenizer": "same-name"}
    assert verdict(declared, declared, tmp_path) == SAME   # no card yet: the directories are not materialised
    for slug in ("a", "b"):
        (tmp_path / slug / "kvpipe_model.json").write_text("{}")
    assert verdict(declared, declared, tmp_path) == DIFFERENT
    (tmp_path / "b" / "tokenizer.json").write_text(json.dumps({"vocab": "x"}))
    assert verdict(PYPI, PYPI | {"tokenizer": "other"}, tmp_path) == SAME


def test_shipped_configs_pass_and_a_cross_family_pair_with_projection_is_refused(tmp_path):
    for overlays in ([], ["config/cross_family.yaml"], ["config/qwen2.5-3b-7b.yaml"], ["config/squad_v2.yaml"]):
        check_projection_tokenizers(load_config([REPO / "config.yaml", *(REPO / o for o in overlays)]), tmp_path)
    cross = load_config([REPO / "config.yaml", REPO / "config/cross_family.yaml"])
    assert pair_tokenizers(cross, "qwen-0.5b-1.5b", tmp_path)[0] == SAME
    assert {pair_tokenizers(cross, p, tmp_path)[0] for p in cross["run"]["pairs"][1:]} == {DIFFERENT}
    cross = copy.deepcopy(cross)
    cross["run"]["stages"] = ["structure", "selection", "projection"]
    with pytest.raises(KvpipeError, match=r"^run.stages: includes projection, .* pair smollm-qwen is in run.pairs"):
        check_projection_tokenizers(cross, tmp_path)


def test_smoke_pair_shares_its_tokenizer(tmp_path):
    config = load_config([REPO / "config.yaml", SMOKE])
    assert pair_tokenizers(config, "tiny", tmp_path)[0] == SAME
