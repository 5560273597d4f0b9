"""Readers of the SAVED adapter files shared by check_examples.py and check_gemma_examples.py.

Nothing here comes from the training scripts: the checks rebuild every dW from the files
alone, with the formulas of shared/adapter-formats.md.
"""
import json
import os
import re

import torch

INCRELORA_KEY = re.compile(r"^(.*)\.lora_([AEB])\.(\d+)$")


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sizes(folder):
    return {f: os.path.getsize(os.path.join(folder, f)) for f in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, f))}


def increlora_deltas(sd, alpha, strict=False):
    """IncreLoRA dW = cat(B_k, 1) @ (cat(A_k, 0) * cat(E_k, 0)) * alpha / (ranknum + 1e-5) per
    module, from a state dict with P.lora_{A,E,B}.k and P.ranknum. Returns (deltas, ranks) with
    ranks[P] = (list entries, nonzero E, ranknum). ``strict``: every other key must be a
    ranknum (no base tensors) and the shapes are checked."""
    parts = {}
    for key, t in sd.items():
        m = INCRELORA_KEY.match(key)
        if m:
            parts.setdefault(m.group(1), {}).setdefault(m.group(2), {})[int(m.group(3))] = t
        elif strict:
            assert key.endswith(".ranknum"), f"unexpected key {key} (base tensors must not be saved)"
    deltas, ranks = {}, {}
    for p in sorted(parts):
        d = parts[p]
        ks = sorted(d["A"])
        assert ks == sorted(d["E"]) == sorted(d["B"]) == list(range(len(ks)))
        A = torch.cat([d["A"][k] for k in ks], 0)
        E = torch.cat([d["E"][k] for k in ks], 0)
        B = torch.cat([d["B"][k] for k in ks], 1)
        if strict:
            assert E.shape == (A.shape[0], 1) and B.shape[1] == A.shape[0]
        ranknum = sd[p + ".ranknum"]
        if strict:
            assert ranknum.shape == (1,)
        deltas[p] = B @ (A * E) * (alpha / (ranknum + 1e-5))
        ranks[p] = (A.shape[0], int((E != 0).sum()), int(ranknum.item()))
    return deltas, ranks
