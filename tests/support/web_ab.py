"""Judging ``web/test/ab-scenario.mjs`` (A/B while adapters change, in Node or in the page): every
answer against the expected output of the adapter its arm held at the call's generation."""

from __future__ import annotations

from collections import Counter

import numpy as np

AB_TOL = 1e-6  # same wasm binary, same inputs: only the order of concurrent calls differs
AB_OPTIONS = {"callers": 6, "per_phase": 4}
#: the scenario's arms, generation by generation: the source adapter each serves (None: the base)
AB_SOURCES = {"A": ["sora", "increlora", None, "sora", "sora"],
              "B": ["increlora", "increlora", None, "increlora", "increlora"]}


def ab_files(adapters) -> dict[str, str]:
    return {name: f"adapters/{name}.safetensors" for name in adapters}


def wrong_answers(ab: dict, expected: dict) -> list[str]:
    """Calls whose recorded adapter is not their arm's at their generation, or whose outputs are
    not that adapter's for their text (``expected[source][text]``); direct calls with ``extra``."""
    phase = {(p["arm"], p["generation"]): p for p in ab["phases"]}
    wrong = []
    for c in ab["calls"]:
        p = phase.get((c["arm"], c["generation"]))
        if p is None or c["adapter"] != p["adapter"]:
            wrong.append(f"{c['key']}: arm {c['arm']} generation {c['generation']} answered with {c['adapter']}")
            continue
        diff = float(np.abs(np.asarray(c["outputs"]) - expected[p["source"]][c["text"]]).max())
        if diff > AB_TOL:
            wrong.append(f"{c['key']}: |Δ| {diff:.2e} against {p['source']}")
    for d in ab["direct"]:
        if "error" in d or d["adapter"] != "extra" or \
                float(np.abs(np.asarray(d["outputs"]) - expected["increlora"][d["text"]]).max()) > AB_TOL:
            wrong.append(f"direct call with extra on text {d['text']}: {d.get('error', 'wrong answer')}")
    return wrong


def check_ab_scenario(ab: dict, expected: dict) -> dict:
    """Assert the scenario ran as planned with 0 wrong answers; its counts."""
    assert ab["swapError"] is None and not ab["failures"], (ab["swapError"], ab["failures"][:3])
    distinct = [expected["sora"], expected["increlora"], expected[None]]
    assert min(np.abs(a - b).max() for i, a in enumerate(distinct) for b in distinct[i + 1:]) > 1e-2
    wrong = wrong_answers(ab, expected)
    assert not wrong, wrong[:5]
    plan = sorted((p["arm"], p["generation"]) for p in ab["phases"])
    assert plan == sorted((arm, g) for arm, sources in AB_SOURCES.items() for g in range(len(sources)))
    assert all(p["source"] == AB_SOURCES[p["arm"]][p["generation"]] for p in ab["phases"])
    served = Counter((c["arm"], c["generation"]) for c in ab["calls"])
    assert set(served) == set(plan) and min(served.values()) >= AB_OPTIONS["per_phase"], served  # every combination
    crossed = sum(c["crossed"] for c in ab["calls"])
    swaps = len(ab["phases"]) - 2
    # each swap met calls of its arm routed before it and answered after it, with their own adapter
    assert len(ab["inflightAtSwap"]) == swaps and min(ab["inflightAtSwap"]) >= 1 and crossed >= swaps
    assert "adapter extra is not loaded" in ab["refusedAfterUnload"]
    assert ab["ownedALoadedWhileInFlight"] and ab["ownedBLoadedWhileInFlight"]
    assert [o.split(".")[:2] for o in ab["owned"]] == [["ab", "A"], ["ab", "B"]]
    assert sorted(ab["loadedAtEnd"]) == ["increlora", "sora"]  # owned adapters and extra gone once done
    assert "no arm Z" in ab["refused"][0] and "nope is no adapter loaded" in ab["refused"][1]
    assert "absent.safetensors: cannot be" in ab["refused"][2] and ab["keptAfterRefusal"] == "sora"
    return {"calls": len(ab["calls"]), "crossed": crossed, "swaps": swaps, "ms": round(ab["ms"])}
