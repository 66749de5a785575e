"""The cross-pair summary on planted stage tables: one same-family and one cross-family pair."""

import pandas as pd
import pytest

from kvpipe.pairs.summary import summary_markdown, write_pairs_summary


def _metrics(key_r2: float) -> pd.DataFrame:
    rows = []
    for layer in (0, 3):
        for kind, r2 in (("key_pre_rope", key_r2), ("value", 0.2), ("key", 0.1)):
            for metric, value in (("r2", r2), ("r2_per_dim", r2 - 0.05), ("cka_debiased", r2 + 0.05)):
                value = value if layer == 3 else 0.0   # only the last aligned layer is reported
                rows.append({"pair": "p", "kind": kind, "scout_layer": layer, "main_layer": layer, "head": -1,
                             "metric": metric, "value": value, "ci_low": value - 0.02, "ci_high": value + 0.02,
                             "baseline": "none"})
    return pd.DataFrame(rows)


def _aggregates(overlap_gain: float) -> pd.DataFrame:
    rows = [{"table": "full_kv", "role": role, "method": "full", "retention": 1.0, "quantity": quantity, "value": value,
             "ci_low": value - 0.1, "ci_high": value + 0.1}
            for role, quantity, value in (("scout", "f1_answerable", 0.3), ("main", "f1_answerable", 0.6),
                                            ("pair", "f1_main_minus_scout", 0.3))]
    for r in (0.5, 0.75):
        for quantity, value in (("overlap", 0.5 + overlap_gain), ("overlap_random", 0.5),
                                ("overlap_minus_random", overlap_gain)):
            rows.append({"table": "overlap", "role": "pair", "method": "q2c", "retention": r, "quantity": quantity,
                         "value": value, "ci_low": value - 0.03, "ci_high": value + 0.03})
        rows.append({"table": "transfer", "role": "main", "method": "q2c", "retention": r, "quantity": "delta_forward",
                     "value": -0.1 * r, "ci_low": -0.2, "ci_high": 0.0})
        rows.append({"table": "transfer", "role": "scout", "method": "q2c", "retention": r, "quantity": "delta_reverse",
                     "value": 0.05, "ci_low": -0.01, "ci_high": 0.11})
    return pd.DataFrame(rows)


@pytest.fixture
def stage_tables(tmp_path):
    pairs, cards = {}, {}
    for pair, scout, main, key_r2, gain in (("qwen", "q-small", "q-big", 0.95, 0.3), ("cross", "llama", "q-big", 0.4, 0.05)):
        d = tmp_path / pair
        d.mkdir()
        _metrics(key_r2).to_parquet(d / "metrics.parquet")
        _aggregates(gain).to_parquet(d / "aggregates.parquet")
        (d / "facts.json").write_text(f'{{"scout": "{scout}", "main": "{main}", "thresholds": {{"keys_r2": 0.9}}}}')
        pairs[pair] = {"structure_metrics": d / "metrics.parquet", "structure_facts": d / "facts.json",
                       "selection_aggregates": d / "aggregates.parquet"}
    for slug, arch in (("q-small", "qwen2"), ("q-big", "qwen2"), ("llama", "llama")):
        cards[slug] = tmp_path / f"{slug}.json"
        cards[slug].write_text(f'{{"architecture": "{arch}"}}')
    return pairs, cards


def test_summary_reports_each_pair_and_decides_the_notes_predictions(stage_tables, tmp_path):
    pairs, cards = stage_tables
    write_pairs_summary(pairs, cards, "synthetic", tmp_path / "out")
    text = (tmp_path / "out" / "summary.md").read_text()
    qwen = next(line for line in text.splitlines() if line.startswith("| qwen |"))
    cross = next(line for line in text.splitlines() if line.startswith("| cross |"))
    assert "same (qwen2)" in qwen and "0.950 [0.930, 0.970]" in qwen and "0.800 [0.770, 0.830] (0.500)" in qwen
    assert "| 0.300 [0.200, 0.400] | 0.600 [0.500, 0.700] | — / — | +0.300 [+0.200, +0.400] |" in qwen
    assert "selection record has no verdict of its full KV against its no-context floor" in text   # planted: none
    assert "cross (llama → qwen2)" in cross and "0.400 [0.380, 0.420]" in cross and "-0.075 [-0.200, +0.000]" in cross
    assert "Lower overlap across families: holds" in text
    assert "Key transfer fails across families: holds" in text
    table = pd.read_parquet(tmp_path / "out" / "pairs.parquet")
    assert set(table["pair"]) == {"qwen", "cross"} and table.loc[table["pair"] == "cross", "cross_family"].all()
    assert table.query("pair == 'qwen' and quantity == 'keys_r2'")["value"].item() == pytest.approx(0.95)


def test_undecided_and_untested_predictions_are_said_so(stage_tables):
    from kvpipe.pairs.summary import pair_row

    pairs, _ = stage_tables
    arch = {"q-small": "qwen2", "q-big": "qwen2", "llama": "llama"}
    same = pair_row("qwen", _metrics(0.95), {"scout": "q-small", "main": "q-big", "thresholds": {"keys_r2": 0.9}},
                    _aggregates(0.3), arch)
    near = pair_row("cross", _metrics(0.9), {"scout": "llama", "main": "q-big", "thresholds": {"keys_r2": 0.9}},
                    _aggregates(0.29), arch)
    text = summary_markdown([same, near], "d")
    assert "Lower overlap across families: undecided" in text and "Key transfer fails across families: undecided" in text
    assert "not tested" in summary_markdown([same], "d")
    no_75 = _aggregates(0.3).query("retention == 0.5")
    row = pair_row("qwen", _metrics(0.95), {"scout": "q-small", "main": "q-big", "thresholds": {"keys_r2": 0.9}},
                   no_75, arch)
    assert "| — |" in summary_markdown([row], "d")


def test_keys_failing_within_the_family_too_do_not_confirm_the_cross_family_prediction():
    from kvpipe.pairs.summary import pair_row

    arch = {"q-small": "qwen2", "q-big": "qwen2", "llama": "llama"}
    facts = {"thresholds": {"keys_r2": 0.9}}
    same = pair_row("qwen", _metrics(0.73), facts | {"scout": "q-small", "main": "q-big"}, _aggregates(0.3), arch)
    cross = pair_row("cross", _metrics(0.65), facts | {"scout": "llama", "main": "q-big"}, _aggregates(0.05), arch)
    text = summary_markdown([same, cross], "d")
    assert "Key transfer fails across families: not shown: keys fall below 0.9 within the family too" in text
    assert "the cross-family key R² lies below the same-family one" in text
    alone = summary_markdown([cross], "d")
    assert "Key transfer fails across families: not tested against a reference" in alone


def test_a_main_at_its_no_context_floor_gets_no_transfer_verdict():
    """The selection stage's floor guard shows through: the deltas carry its words, and a line says why."""
    from kvpipe.estimands import AT_FLOOR
    from kvpipe.pairs.summary import pair_row

    agg = _aggregates(0.3)
    agg["verdict"] = ""
    agg.loc[agg["quantity"] == "delta_forward", "verdict"] = AT_FLOOR
    agg.loc[agg["quantity"] == "delta_reverse", "verdict"] = "undecided"
    floors = pd.DataFrame([{"table": "full_kv", "role": role, "method": method, "retention": 0.0, "quantity": quantity,
                            "value": value, "ci_low": value - 0.1, "ci_high": value + 0.1, "verdict": verdict}
                           for role, method, quantity, value, verdict in (
                               ("main", "no_context", "f1_answerable", 0.55, ""),
                               ("main", "full", "delta_full_vs_no_context", 0.05, "undecided"),
                               ("scout", "no_context", "f1_answerable", 0.05, ""),
                               ("scout", "full", "delta_full_vs_no_context", 0.25, "better"))])
    row = pair_row("qwen", _metrics(0.95), {"scout": "q-small", "main": "q-big", "thresholds": {"keys_r2": 0.9}},
                   pd.concat([agg, floors]), {"q-small": "qwen2", "q-big": "qwen2"})
    text = summary_markdown([row], "d")
    line = next(line for line in text.splitlines() if line.startswith("| qwen |"))
    assert "| 0.050 [-0.050, 0.150] / 0.550 [0.450, 0.650] |" in line
    assert "-0.050 [-0.200, +0.000] (at the floor)" in line and "+0.050 [-0.010, +0.110] (undecided)" in line
    assert "the main (q-big) answers no better from its full KV than with no context (undecided)" in text
    assert "the scout (q-small)" not in text
