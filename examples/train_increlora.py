#!/usr/bin/env python3
"""Train a real IncreLoRA adapter (incremental rank allocation) on all-MiniLM-L6-v2 for the
shipped sentiment data, on CPU, and save it in IncreLoRA's own layout.

    python examples/train_increlora.py --out examples/adapters/increlora [--full-model]

Mechanism (IncreLoRA, Zhang et al. 2023, written from the formulas, no upstream code):
every adapted ``nn.Linear`` at path P is replaced by an ``SVDLinear`` that keeps the base
``weight``/``bias`` (frozen) and holds ParameterLists ``lora_A`` (entry 0 ``[r0,in]``, then
``[1,in]`` per added rank), ``lora_E`` (``[r0,1]``, then ``[1,1]``), ``lora_B`` (``[out,r0]``,
then ``[out,1]``) and a non-trainable ``ranknum [1]`` = number of active ranks. Forward adds
``x @ (cat(B,1) @ (cat(A,0) * cat(E,0))).T * lora_alpha / (ranknum + 1e-5)``.

Allocation: every module starts with r0 = 1 active rank plus ONE trailing reserve rank
(E = 1e-5 held fixed, A and B train: "advance learning"). After a warm-up, every
``delta_t`` steps the modules are ranked by their smoothed importance (AdaLoRA-style
sensitivity |p * grad| with an EMA and an uncertainty EMA, averaged over the module's LoRA
parameters); the top-k modules turn their reserve rank into an active rank (ranknum += 1,
its E starts training) and get a fresh reserve rank. When the total rank budget is reached
every remaining reserve rank gets E = 0.0 exactly and stops training (the entries stay in
the lists). Learned E entries are never forced to zero. A, B follow AdaLoRA's orthogonal
regulariser.

Output folder:
  pytorch_model.bin  torch.save(state_dict): per module P.lora_A.k / P.lora_E.k / P.lora_B.k
                     for every entry k, P.ranknum, and the head classifier.weight/.bias;
                     with --full-model also every base tensor (bert.embeddings.*, P.weight,
                     P.bias, LayerNorms, bert.pooler.*), i.e. IncreLoRA's full-model save.
                     The default (shipped) leaves the base out to stay < 5 MB.
  config.json        the MiniLM BertConfig (BertForSequenceClassification, 2 labels) plus
                     IncreLoRA's apply_lora / lora_type / lora_module / lora_alpha / lora_dropout / lora_r
  rank_pattern.json  {module path: ranknum}
  train_log.json     hyper-parameters, steps, eval accuracy, wall time, per-module rank
"""
import argparse
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

RESERVE_E = 1e-5


class SVDLinear(nn.Module):
    """IncreLoRA's replacement Linear: base weight/bias + growing SVD-form LoRA lists."""

    def __init__(self, base: nn.Linear, r0, lora_alpha):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # frozen base tensors, same keys as the original Linear
        self.bias = base.bias
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(common.HERE, "adapters", "increlora"))
    ap.add_argument("--full-model", action="store_true",
                    help="also save every base tensor (IncreLoRA's full-model checkpoint, ~90 MB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--r0", type=int, default=1)
    ap.add_argument("--lora-alpha", type=float, default=16)
    ap.add_argument("--lr", type=float, default=5e-3, help="AdamW lr for lora_A/lora_B/head")
    ap.add_argument("--lr-e", type=float, default=5e-2, help="AdamW lr for lora_E")
    ap.add_argument("--budget", type=int, default=144, help="total active ranks (36 modules x 4)")
    ap.add_argument("--warmup-steps", type=int, default=20, help="steps before the first allocation")
    ap.add_argument("--delta-t", type=int, default=8, help="steps between allocations")
    ap.add_argument("--top-k", type=int, default=9, help="modules that get a rank per allocation")
    ap.add_argument("--beta1", type=float, default=0.85)
    ap.add_argument("--beta2", type=float, default=0.85)
    ap.add_argument("--orth-reg", type=float, default=0.1)
    args = ap.parse_args()

    common.setup(args.seed)
    timer = common.Timer()
    tok = common.load_tokenizer()
    data = common.load_data(tok)
    model = common.load_model(seed=args.seed)
    paths = common.target_paths()
    torch.manual_seed(args.seed)
    mods = {}
    for path in paths:
        mods[path] = SVDLinear(common.get_module(model, path), args.r0, args.lora_alpha)
        common.set_module(model, path, mods[path])

    head = [model.classifier.weight, model.classifier.bias]
    ab_params = [p for m in mods.values() for lst in (m.lora_A, m.lora_B) for p in lst]
    e_params = [p for m in mods.values() for p in m.lora_E if p.requires_grad]
    opt = torch.optim.AdamW([{"params": ab_params, "weight_decay": 0.0, "base_lr": args.lr},
                             {"params": e_params, "weight_decay": 0.0, "base_lr": args.lr_e},
                             {"params": head, "weight_decay": 0.01, "base_lr": args.lr}], lr=args.lr)

    steps_per_epoch = math.ceil(len(data["train"][2]) / common.BATCH_SIZE)
    total = steps_per_epoch * args.epochs
    warm = int(0.06 * total)
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
    allocations = []
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    step = 0
    for epoch in range(args.epochs):
        run_loss = 0.0
        for b in common.batches(data["train"], common.BATCH_SIZE, shuffle=True, generator=gen):
            f = common.linear_schedule(step, total, warm)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
            loss = model(**b).loss
            reg = sum(orth_reg(m) for m in mods.values()) / len(mods)
            opt.zero_grad(set_to_none=True)
            (loss + args.orth_reg * reg).backward()
            scores = update_importance()
            opt.step()
            run_loss += float(loss.detach())
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
                    with torch.no_grad():
                        for m in mods.values():  # the last entry of every list is a reserve
                            m.lora_E[-1].zero_()
                            for t in (m.lora_A[-1], m.lora_E[-1], m.lora_B[-1]):
                                t.requires_grad_(False)
                                t.grad = None
                    print(f"step {step}: budget {args.budget} reached, reserve E set to 0.0", flush=True)
        print(f"epoch {epoch + 1}: loss {run_loss / steps_per_epoch:.4f}  active ranks {active}  "
              f"[{timer()} s]", flush=True)

    ev = common.evaluate(model, data["eval"])
    acc = ev["accuracy"]
    ranks = {p: int(m.ranknum.item()) for p, m in mods.items()}
    live = {p: int((torch.cat(list(m.lora_E), 0) != 0).sum()) for p, m in mods.items()}
    entries = {p: len(m.lora_E) for p, m in mods.items()}
    print(f"eval accuracy {acc:.4f}; active ranks {sum(ranks.values())} "
          f"(list entries {sum(entries.values())}, nonzero E {sum(live.values())}); "
          f"per-module ranknum {sorted(ranks.values())}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    full_sd = model.state_dict()
    keep = lambda k: (args.full_model or ".lora_" in k or k.endswith(".ranknum")
                      or k.startswith("classifier."))
    sd = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in full_sd.items() if keep(k)}
    torch.save(sd, os.path.join(args.out, "pytorch_model.bin"))

    cfg = model.config.to_dict()
    cfg["architectures"] = ["BertForSequenceClassification"]
    cfg["_name_or_path"] = common.BASE_MODEL_NAME
    cfg.update({"apply_lora": True, "lora_type": "svd",
                "lora_module": "query,key,value,intermediate,layer.output,attention.output",
                "lora_alpha": int(args.lora_alpha), "lora_dropout": 0.0, "lora_r": args.r0})
    common.write_json(os.path.join(args.out, "config.json"), cfg)
    common.write_json(os.path.join(args.out, "rank_pattern.json"), ranks)
    common.write_json(os.path.join(args.out, "train_log.json"), {
        "method": "IncreLoRA",
        "base_model": common.BASE_MODEL_NAME,
        "data": "examples/data/sentiment",
        "hyper_parameters": {
            "seed": args.seed, "epochs": args.epochs, "batch_size": common.BATCH_SIZE,
            "max_len": common.MAX_LEN, "lora_r (r0)": args.r0, "lora_alpha": args.lora_alpha,
            "scale": "lora_alpha / (ranknum + 1e-5)",
            "lr_adamw": args.lr, "lr_adamw_E": args.lr_e, "lr_schedule": f"linear warm-up {warm} steps, linear decay to 10%",
            "rank_budget": args.budget, "allocation_warmup_steps": args.warmup_steps,
            "delta_t": args.delta_t, "top_k": args.top_k, "importance": "mean over the module's "
            "LoRA params of EMA(|p*grad|, beta1) * EMA(|s - EMA|, beta2)",
            "beta1": args.beta1, "beta2": args.beta2, "orth_reg_coef": args.orth_reg,
            "reserve_E_while_training": RESERVE_E, "full_model_saved": args.full_model,
            "target_modules": common.LINEAR_PATHS,
        },
        "steps": step,
        "eval_accuracy": acc,
        "eval_mean_margin": ev["mean_margin"],
        "eval_mean_abs_margin": ev["mean_abs_margin"],
        "eval_predicted_positive": ev["predicted_positive"],
        "wall_seconds": timer(),
        "ranks_initial_total": len(paths) * args.r0,
        "ranks_active_total": sum(ranks.values()),
        "list_entries_total": sum(entries.values()),
        "nonzero_E_total": sum(live.values()),
        "allocations": allocations,
        "per_module_rank": ranks,
        "per_module_list_entries": entries,
        "per_module_nonzero_E": live,
    })
    print(f"saved to {args.out} ({len(sd)} tensors) [{timer()} s]")


if __name__ == "__main__":
    main()
