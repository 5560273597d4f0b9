#!/usr/bin/env python3
"""Independent check of the three shipped example adapters.

    python examples/check_examples.py [--adapters examples/adapters]

For each adapter this rebuilds every module's dW from the SAVED files alone (no code from the
training scripts), with the formulas of shared/adapter-formats.md:

  SoRA       dW = (lora_alpha / r) * B @ diag(gate[0]) @ A        (r = tensor rank dim,
                                                                     alpha from lora_config.json)
  IncreLoRA  dW = cat(B_k, 1) @ (cat(A_k, 0) * cat(E_k, 0)) * lora_alpha / (ranknum + 1e-5)
  B-LoRA     dW = (lora_alpha / r) * B @ diag(E * mask) @ A,  mask = [1, cumprod(gamma_2 > -0.9353)]

merges it into a fresh BertForSequenceClassification (all-MiniLM-L6-v2), puts the saved head
in, recomputes the eval accuracy and compares it (and the mean logit margin) with what the
training script reported in its train_log.json, on the same eval texts (the first
``eval_texts`` when the log names them, as a run with --eval-limit does). For B-LoRA it also
rebuilds the learned weight quantization (bits from the gamma_{4,8,16,32} chain, symmetric grid
from each saved tensor's own max|x|) and compares with the script's quantized accuracy.
Prints per adapter: file sizes, per-module rank (max -> live), accuracy. Exits 1 on any mismatch
or if an adapter folder is 5 MB or more.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import adapter_files  # noqa: E402
import common  # noqa: E402
from adapter_files import load_json, sizes  # noqa: E402

TEST_THRESHOLD = -0.9353
SIZE_LIMIT = 5 * 1024 * 1024
MARGIN_TOL = 2e-3


# ------------------------------------------------------------------ SoRA
def sora_delta(folder):
    sd = torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    cfg_path = os.path.join(folder, "lora_config.json")
    alpha = load_json(cfg_path).get("lora_alpha", 16) if os.path.exists(cfg_path) else 16
    from safetensors.torch import load_file
    head = load_file(os.path.join(folder, "head.safetensors"))
    deltas, ranks = {}, {}
    for key in sorted(sd):
        if not key.endswith(".lora.gate"):
            continue
        p = key[: -len(".lora.gate")]
        A, B, g = sd[p + ".lora.lora_A"], sd[p + ".lora.lora_B"], sd[key]
        r = A.shape[0]
        assert g.shape == (1, r) and B.shape[1] == r
        deltas[p] = (alpha / r) * (B * g[0]) @ A
        ranks[p] = (r, int((g[0] != 0).sum()))
    extra = sorted(k for k in sd if ".lora." not in k)
    assert not extra, f"unexpected non-LoRA keys {extra[:3]}"
    return deltas, head, ranks, {}


# ------------------------------------------------------------------ IncreLoRA
def increlora_delta(folder):
    sd = torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    cfg = load_json(os.path.join(folder, "config.json"))
    deltas, ranks = adapter_files.increlora_deltas(sd, cfg["lora_alpha"])
    head = {k: sd[k] for k in ("classifier.weight", "classifier.bias")}
    return deltas, head, ranks, {"full_model": any(k.endswith("word_embeddings.weight") for k in sd)}


# ------------------------------------------------------------------ B-LoRA
def quantize_sym(x, bits):
    """Symmetric b-bit grid from the tensor's own range: s = 2*max|x| / (2^b - 1)."""
    m = x.abs().max()
    if float(m) == 0.0:
        return x
    s = 2 * m / (2 ** bits - 1)
    n = 2 ** (bits - 1) - 1
    return s * torch.clamp(torch.round(x / s), -n, n)


def learned_bits(sd, prefix):
    n = 0
    for b in (4, 8, 16, 32):
        g = float(sd[f"{prefix}.quantizer.gamma_{b}"])
        if g <= -2 or g <= TEST_THRESHOLD:
            break
        n += 1
    return 2 * 2 ** n


def blora_delta(folder, quantized=False):
    from safetensors.torch import load_file
    sd = load_file(os.path.join(folder, "adapter_model.safetensors"))
    cfg = load_json(os.path.join(folder, "adapter_config.json"))
    assert cfg["peft_type"] == "BLORA"
    r, alpha = cfg["r"], cfg["lora_alpha"]
    pre = "base_model.model."
    deltas, ranks, bits = {}, {}, {}
    for key in sorted(sd):
        if not key.endswith(".lora_E"):
            continue
        full = key[: -len(".lora_E")]
        p = full[len(pre):]
        A, E, B = sd[full + ".lora_A"], sd[key], sd[full + ".lora_B"]
        assert A.shape[0] == r and E.shape == (r, 1) and B.shape[1] == r
        g2 = sd[full + ".lora_E_quantizer.quantizer.gamma_2"]
        assert g2.shape == (r - 1,)
        mask = torch.cat([torch.ones(1), torch.cumprod((g2 > TEST_THRESHOLD).float(), 0)])
        bits[p] = {t: learned_bits(sd, f"{full}.{t}_quantizer") for t in ("lora_A", "lora_B", "lora_E")}
        for t in ("lora_A_act", "lora_E_act", "lora_AB_act"):
            for b in (4, 8, 16, 32):
                assert sd[f"{full}.{t}_quantizer.quantizer.gamma_{b}"].shape == (1,)
        if quantized:
            A, B, E = (quantize_sym(A, bits[p]["lora_A"]), quantize_sym(B, bits[p]["lora_B"]),
                       quantize_sym(E, bits[p]["lora_E"]))
        deltas[p] = (alpha / r) * (B * (E[:, 0] * mask)) @ A
        ranks[p] = (r, int(mask.sum()))
    head = {"classifier.weight": sd[pre + "classifier.weight"], "classifier.bias": sd[pre + "classifier.bias"]}
    return deltas, head, ranks, {"bits": bits}


# ------------------------------------------------------------------ evaluation
def merged_eval(deltas, head, eval_split):
    model = common.load_model(seed=0)
    sd = model.state_dict()
    with torch.no_grad():
        for p, d in deltas.items():
            w = sd[p + ".weight"]
            assert w.shape == d.shape, (p, w.shape, d.shape)
            w.add_(d.to(w.dtype))
        model.classifier.weight.copy_(head["classifier.weight"])
        model.classifier.bias.copy_(head["classifier.bias"])
    return common.evaluate(model, eval_split)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", default=os.path.join(common.HERE, "adapters"))
    args = ap.parse_args()
    common.setup(0)
    data = common.load_data(common.load_tokenizer())
    ok = True
    summary = {}
    for name, fn in (("sora", sora_delta), ("increlora", increlora_delta), ("blora", blora_delta)):
        folder = os.path.join(args.adapters, name)
        log = load_json(os.path.join(folder, "train_log.json"))
        # the eval texts the trainer evaluated: the first eval_texts (a run with --eval-limit), else all
        eval_split = tuple(t[:log.get("eval_texts")] for t in data["eval"])
        print(f"=== {name}: {folder}")
        sz = sizes(folder)
        total = sum(sz.values())
        for f, n in sz.items():
            print(f"  {f:28s} {n:>10,d} bytes")
        print(f"  folder total {total:,d} bytes ({total / 2**20:.2f} MiB) {'OK' if total < SIZE_LIMIT else 'TOO BIG'}")
        ok &= total < SIZE_LIMIT
        deltas, head, ranks, info = fn(folder)
        for p, rk in ranks.items():
            extra = ""
            if name == "increlora":
                extra = f"  (list entries {rk[0]}, ranknum {rk[2]})"
            if name == "blora":
                b = info["bits"][p]
                extra = f"  bits A/B/E {b['lora_A']}/{b['lora_B']}/{b['lora_E']}"
            print(f"  {p:45s} rank {rk[0]} -> {rk[1]}{extra}")
        before = sum(rk[0] for rk in ranks.values())
        live = sum(rk[1] for rk in ranks.values())
        ev = merged_eval(deltas, head, eval_split)
        match = (abs(ev["accuracy"] - log["eval_accuracy"]) < 1e-9
                 and abs(ev["mean_margin"] - log["eval_mean_margin"]) < MARGIN_TOL
                 and abs(ev["mean_abs_margin"] - log["eval_mean_abs_margin"]) < MARGIN_TOL)
        ok &= match
        print(f"  modules {len(ranks)}; ranks {before} -> {live} live "
              f"({100 * (1 - live / before):.1f}% pruned); modules with no live rank: "
              f"{sum(1 for rk in ranks.values() if rk[1] == 0)}")
        print(f"  eval accuracy from saved files (merged dW) {ev['accuracy']:.4f}, "
              f"margin {ev['mean_margin']:.4f} / |margin| {ev['mean_abs_margin']:.4f}; trainer reported "
              f"{log['eval_accuracy']:.4f}, {log['eval_mean_margin']:.4f} / {log['eval_mean_abs_margin']:.4f}"
              f" -> {'MATCH' if match else 'MISMATCH'}")
        ev0 = merged_eval({}, head, eval_split)
        print(f"  control: same head, dW = 0 (no adapter): eval accuracy {ev0['accuracy']:.4f}")
        rec = {"bytes": total, "ranks_before": before, "ranks_live": live, "accuracy": ev["accuracy"],
               "accuracy_head_only": ev0["accuracy"],
               "trainer_accuracy": log["eval_accuracy"], "match": match}
        if name == "increlora":
            act = sum(rk[2] for rk in ranks.values())
            print(f"  active ranks (sum of ranknum) {act}; full-model file: {info['full_model']}")
            rec["ranknum_total"] = act
        if name == "blora":
            dq, hq, _, _ = blora_delta(folder, quantized=True)
            evq = merged_eval(dq, hq, eval_split)
            mq = (abs(evq["accuracy"] - log["eval_accuracy_quantized"]) < 1e-9
                  and abs(evq["mean_abs_margin"] - log["eval_mean_abs_margin_quantized"]) < MARGIN_TOL)
            ok &= mq
            hist = {}
            for b in info["bits"].values():
                for v in b.values():
                    hist[v] = hist.get(v, 0) + 1
            print(f"  learned weight bits histogram {dict(sorted(hist.items()))}")
            print(f"  eval accuracy with learned quantization from saved files {evq['accuracy']:.4f}; "
                  f"|margin| {evq['mean_abs_margin']:.4f}; trainer reported {log['eval_accuracy_quantized']:.4f}, "
                  f"{log['eval_mean_abs_margin_quantized']:.4f} -> {'MATCH' if mq else 'MISMATCH'}")
            rec.update({"accuracy_quantized": evq["accuracy"], "bits_histogram": hist})
        summary[name] = rec
    print(json.dumps(summary, indent=1, default=str))
    print("ALL OK" if ok else "CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
