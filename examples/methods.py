"""The adapter methods shared by the example trainers (MiniLM and Gemma):

* SoRA (Ding et al. 2023): the gated parallel LoRA branch ``<linear>.lora`` and the proximal
  (soft-thresholding) gate step, with its xi schedule;
* IncreLoRA (Zhang et al. 2023): the ``SVDLinear`` replacement layer with growing LoRA lists,
  AdaLoRA's orthogonal regulariser, the smoothed importance scores and the rank allocation.

Used by train_sora.py, train_sora_gemma.py, train_increlora.py and train_increlora_gemma.py.
Everything here is written from the formulas, no upstream code.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


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
    """Attach a ``SoRAParallel`` as ``<linear>.lora`` to every linear in ``paths`` (in order)
    and add its output to the linear's output through a forward hook."""
    for path in paths:
        lin = model.get_submodule(path)
        lin.lora = SoRAParallel(lin.in_features, lin.out_features, r, lora_alpha)
        lin.register_forward_hook(lambda mod, inp, out: out + mod.lora(inp[0]))
    return paths


def xi_schedule(xi, total, warmup_frac, ramp_frac):
    """SoRA's soft-threshold schedule: 0 for steps < xi_start, then linear to ``xi`` at
    xi_full, then constant. Returns (xi_at, xi_start, xi_full)."""
    xi_start, xi_full = int(warmup_frac * total), max(1, int(ramp_frac * total))

    def xi_at(step):
        if step < xi_start:
            return 0.0
        return xi * min(1.0, (step - xi_start + 1) / max(1, xi_full - xi_start))

    return xi_at, xi_start, xi_full


@torch.no_grad()
def sora_gate_step(gates, gate_lr, f, xi):
    """SoRA's proximal gate step: SGD on the gate gradient (lr ``gate_lr * f``), then
    soft-threshold with xi (shift towards 0 by xi, then |g| < xi -> exactly 0.0)."""
    for g in gates:
        g.add_(g.grad, alpha=-gate_lr * f)
        if xi > 0:
            g.sub_(xi * torch.sign(g))
            g.masked_fill_(g.abs() < xi, 0.0)


def sora_backward_step(opt, gates, loss):
    """Backward and AdamW step for A/B (+ head); the gates' gradients are left for
    ``sora_gate_step``."""
    opt.zero_grad(set_to_none=True)
    for g in gates:
        g.grad = None
    loss.backward()
    opt.step()


def save_sora(model, out, paths, r, lora_alpha):
    """SoRA's own files: pytorch_model.bin with ONLY the ``.lora.`` tensors (float32) and
    lora_config.json. Returns the saved state dict."""
    os.makedirs(out, exist_ok=True)
    sd = {k: v.detach().to(torch.float32).contiguous().clone()
          for k, v in model.state_dict().items() if ".lora." in k}
    assert len(sd) == 3 * len(paths)
    torch.save(sd, os.path.join(out, "pytorch_model.bin"))
    common.write_json(os.path.join(out, "lora_config.json"),
                      {"lora_r": r, "lora_alpha": int(lora_alpha)})
    return sd


# ------------------------------------------------------------------ IncreLoRA
RESERVE_E = 1e-5


class SVDLinear(nn.Module):
    """IncreLoRA's replacement Linear: base weight (+ bias) + growing SVD-form LoRA lists."""

    def __init__(self, base: nn.Linear, r0, lora_alpha):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # frozen base tensors, same keys as the original Linear
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


def add_svd_linears(model, paths, r0, lora_alpha, set_module):
    """Replace every linear in ``paths`` (in order) by an ``SVDLinear``; {path: SVDLinear}."""
    mods = {}
    for path in paths:
        mods[path] = SVDLinear(model.get_submodule(path), r0, lora_alpha)
        set_module(model, path, mods[path])
    return mods


def svd_param_groups(mods, lr, lr_e):
    """AdamW groups for the A/B lists and the trainable E entries (no weight decay)."""
    ab_params = [p for m in mods.values() for lst in (m.lora_A, m.lora_B) for p in lst]
    e_params = [p for m in mods.values() for p in m.lora_E if p.requires_grad]
    return [{"params": ab_params, "weight_decay": 0.0, "base_lr": lr},
            {"params": e_params, "weight_decay": 0.0, "base_lr": lr_e}]


def increlora_backward_step(opt, mods, importance, loss, orth_coef):
    """Backward of loss + orth_coef * mean orthogonal regulariser, importance update (on the
    fresh gradients), AdamW step. Returns (reg, scores)."""
    reg = sum(orth_reg(m) for m in mods.values()) / len(mods)
    opt.zero_grad(set_to_none=True)
    (loss + orth_coef * reg).backward()
    scores = importance.update()
    opt.step()
    return reg, scores


def lora_of(m):
    return [p for lst in (m.lora_A, m.lora_E, m.lora_B) for p in lst]


class Importance:
    """AdaLoRA-style smoothed sensitivity: per parameter EMA(|p * grad|, beta1) and the EMA of
    its uncertainty |s - EMA| (beta2); a module's score is the mean over its LoRA parameters
    of EMA * uncertainty."""

    def __init__(self, mods, beta1, beta2):
        self.mods, self.beta1, self.beta2 = mods, beta1, beta2
        self.ipt, self.unc = {}, {}  # smoothed sensitivity and its uncertainty (by id)

    def update(self):
        ipt, unc = self.ipt, self.unc
        scores = {}
        for path, m in self.mods.items():
            vals = []
            for p in lora_of(m):
                if p.grad is None:
                    continue
                s = (p * p.grad).abs().detach()
                k = id(p)
                if k not in ipt:
                    ipt[k], unc[k] = torch.zeros_like(s), torch.zeros_like(s)
                ipt[k].mul_(self.beta1).add_(s, alpha=1 - self.beta1)
                unc[k].mul_(self.beta2).add_((s - ipt[k]).abs(), alpha=1 - self.beta2)
                vals.append(float((ipt[k] * unc[k]).mean()))
            scores[path] = sum(vals) / max(1, len(vals))
        return scores


def allocate_ranks(mods, paths, scores, k, opt, lr, lr_e, f):
    """The top-k modules (by score, ties by path order) turn their reserve rank into an active
    rank and get a fresh reserve; the new entries join ``opt`` as two param groups. Returns
    the chosen paths."""
    chosen = sorted(paths, key=lambda p: (-scores[p], paths.index(p)))[:k]
    new_ab, new_e = [], []
    for p in chosen:
        m = mods[p]
        m.lora_E[-1].requires_grad_(True)  # the reserve becomes an active rank
        new_e.append(m.lora_E[-1])
        m.ranknum.add_(1.0)
        m.add_reserve()
        new_ab += [m.lora_A[-1], m.lora_B[-1]]
    opt.add_param_group({"params": new_ab, "weight_decay": 0.0, "base_lr": lr,
                         "lr": lr * f})
    opt.add_param_group({"params": new_e, "weight_decay": 0.0, "base_lr": lr_e,
                         "lr": lr_e * f})
    return chosen


@torch.no_grad()
def retire_reserves(mods):
    """Budget reached: the last entry of every list is a reserve; its E becomes exactly 0.0
    and the entry stops training."""
    for m in mods.values():
        m.lora_E[-1].zero_()
        for t in (m.lora_A[-1], m.lora_E[-1], m.lora_B[-1]):
            t.requires_grad_(False)
            t.grad = None


def is_allocation_step(step, warmup_steps, delta_t):
    return step >= warmup_steps and (step - warmup_steps) % delta_t == 0


class RankAllocator:
    """IncreLoRA's incremental allocation schedule: after ``warmup_steps`` and then every
    ``delta_t`` steps the ``top_k`` modules by importance get one more active rank, until
    ``budget`` active ranks are reached; then every reserve is retired (E = 0.0 exactly)."""

    def __init__(self, mods, paths, budget, warmup_steps, delta_t, top_k, lr, lr_e):
        self.mods, self.paths = mods, paths
        self.budget, self.warmup_steps, self.delta_t, self.top_k = budget, warmup_steps, delta_t, top_k
        self.lr, self.lr_e = lr, lr_e
        self.active = sum(int(m.ranknum.item()) for m in mods.values())
        self.budget_reached = self.active >= budget
        self.budget_step = None
        self.allocations = []

    @classmethod
    def from_args(cls, mods, paths, args):
        return cls(mods, paths, args.budget, args.warmup_steps, args.delta_t, args.top_k,
                   args.lr, args.lr_e)

    def after_step(self, step, scores, opt, f):
        """Call after optimizer step number ``step`` (1-based) with that step's scores."""
        if self.budget_reached or not is_allocation_step(step, self.warmup_steps, self.delta_t):
            return
        k = min(self.top_k, self.budget - self.active)
        chosen = allocate_ranks(self.mods, self.paths, scores, k, opt, self.lr, self.lr_e, f)
        self.active += k
        self.allocations.append({"step": step, "modules": chosen})
        if self.active >= self.budget:
            self.budget_reached = True
            self.budget_step = step
            retire_reserves(self.mods)
            print(f"step {step}: budget {self.budget} reached, reserve E set to 0.0", flush=True)


# ------------------------------------------------------------------ command-line options
def add_sora_args(ap, lr, lr_help, xi):
    """SoRA's options (--r ... --xi-ramp); the defaults that differ per base model are given."""
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16)
    ap.add_argument("--lr", type=float, default=lr, help=lr_help)
    ap.add_argument("--gate-lr", type=float, default=30.0, help="SGD lr of the gate step")
    ap.add_argument("--xi", type=float, default=xi, help="final soft-threshold per step")
    ap.add_argument("--xi-warmup", type=float, default=0.1,
                    help="fraction of steps with xi = 0, then xi ramps linearly to --xi at --xi-ramp")
    ap.add_argument("--xi-ramp", type=float, default=0.4, help="fraction of steps where xi reaches --xi")


def add_increlora_args(ap, lr, lr_help, lr_e, budget, budget_help, delta_t, top_k):
    """IncreLoRA's options (--r0 ... --orth-reg); the defaults that differ per base model are given."""
    ap.add_argument("--r0", type=int, default=1)
    ap.add_argument("--lora-alpha", type=float, default=16)
    ap.add_argument("--lr", type=float, default=lr, help=lr_help)
    ap.add_argument("--lr-e", type=float, default=lr_e, help="AdamW lr for lora_E")
    ap.add_argument("--budget", type=int, default=budget, help=budget_help)
    ap.add_argument("--warmup-steps", type=int, default=20, help="steps before the first allocation")
    ap.add_argument("--delta-t", type=int, default=delta_t, help="steps between allocations")
    ap.add_argument("--top-k", type=int, default=top_k, help="modules that get a rank per allocation")
    ap.add_argument("--beta1", type=float, default=0.85)
    ap.add_argument("--beta2", type=float, default=0.85)
    ap.add_argument("--orth-reg", type=float, default=0.1)


# ------------------------------------------------------------------ IncreLoRA summaries
def increlora_ranks(mods):
    """(ranknum per module, nonzero E entries per module, list entries per module)."""
    ranks = {p: int(m.ranknum.item()) for p, m in mods.items()}
    live = {p: int((torch.cat(list(m.lora_E), 0) != 0).sum()) for p, m in mods.items()}
    entries = {p: len(m.lora_E) for p, m in mods.items()}
    return ranks, live, entries


def write_increlora_config(out, cfg, lora_module, lora_alpha, r0, ranks):
    """config.json (the base config ``cfg`` plus IncreLoRA's fields) and rank_pattern.json."""
    cfg.update({"apply_lora": True, "lora_type": "svd", "lora_module": lora_module,
                "lora_alpha": int(lora_alpha), "lora_dropout": 0.0, "lora_r": r0})
    common.write_json(os.path.join(out, "config.json"), cfg)
    common.write_json(os.path.join(out, "rank_pattern.json"), ranks)


def increlora_hparams(args, warm):
    """The IncreLoRA part of train_log.json's hyper_parameters."""
    return {
        "lora_r (r0)": args.r0, "lora_alpha": args.lora_alpha,
        "scale": "lora_alpha / (ranknum + 1e-5)",
        "lr_adamw": args.lr, "lr_adamw_E": args.lr_e,
        "lr_schedule": f"linear warm-up {warm} steps, linear decay to 10%",
        "rank_budget": args.budget, "allocation_warmup_steps": args.warmup_steps,
        "delta_t": args.delta_t, "top_k": args.top_k, "importance": "mean over the module's "
        "LoRA params of EMA(|p*grad|, beta1) * EMA(|s - EMA|, beta2)",
        "beta1": args.beta1, "beta2": args.beta2, "orth_reg_coef": args.orth_reg,
        "reserve_E_while_training": RESERVE_E,
    }


def increlora_rank_log(paths, r0, ranks, live, entries, allocations):
    """The rank summary fields of IncreLoRA's train_log.json."""
    return {
        "ranks_initial_total": len(paths) * r0,
        "ranks_active_total": sum(ranks.values()),
        "list_entries_total": sum(entries.values()),
        "nonzero_E_total": sum(live.values()),
        "allocations": allocations,
        "per_module_rank": ranks,
        "per_module_list_entries": entries,
        "per_module_nonzero_E": live,
    }
