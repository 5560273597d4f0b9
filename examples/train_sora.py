#!/usr/bin/env python3
"""Train a real SoRA adapter (sparse low-rank adaptation with a proximal-gradient gate) on
all-MiniLM-L6-v2 for the shipped sentiment data, on CPU, and save it in SoRA's own layout.

    python examples/train_sora.py --out examples/adapters/sora

Mechanism (SoRA, Ding et al. 2023, written from the formulas, no upstream code):
every adapted ``nn.Linear`` at path P gets a parallel module ``P.lora`` with
``lora_A [r,in]`` (kaiming-uniform), ``lora_B [out,r]`` (zeros), ``gate [1,r]`` (ones);
forward adds ``((x @ A.T) * gate) @ B.T * (lora_alpha / r)``.
A, B and the classifier head train with AdamW. The gate trains with SoRA's proximal (sparse)
step: a plain SGD step on its gradient, then soft-thresholding with xi,
``g <- sign(g) * max(|g| - xi, 0)`` (so |g| < xi becomes exactly 0.0). xi ramps up linearly
after a short warm-up so that a clear fraction of the gates end exactly 0.0.

Output folder (SoRA layout):
  pytorch_model.bin  torch.save(state_dict) of ONLY the LoRA tensors,
                     keys bert.encoder.layer.N.<linear>.lora.{lora_A,lora_B,gate}
  lora_config.json   {"lora_r": 8, "lora_alpha": 16}  (SoRA's config file)
  head.safetensors   classifier.weight / classifier.bias (SoRA's file carries no head)
  train_log.json     hyper-parameters, steps, eval accuracy, wall time, per-module rank
"""
import argparse
import math
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


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


def add_sora(model, r, lora_alpha):
    paths = common.target_paths()
    for path in paths:
        lin = common.get_module(model, path)
        lin.lora = SoRAParallel(lin.in_features, lin.out_features, r, lora_alpha)
        lin.register_forward_hook(lambda mod, inp, out: out + mod.lora(inp[0]))
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(common.HERE, "adapters", "sora"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16)
    ap.add_argument("--lr", type=float, default=2e-3, help="AdamW lr for lora_A/lora_B/head")
    ap.add_argument("--gate-lr", type=float, default=30.0, help="SGD lr of the gate step")
    ap.add_argument("--xi", type=float, default=0.008, help="final soft-threshold per step")
    ap.add_argument("--xi-warmup", type=float, default=0.1,
                    help="fraction of steps with xi = 0, then xi ramps linearly to --xi at --xi-ramp")
    ap.add_argument("--xi-ramp", type=float, default=0.4, help="fraction of steps where xi reaches --xi")
    args = ap.parse_args()

    common.setup(args.seed)
    timer = common.Timer()
    tok = common.load_tokenizer()
    data = common.load_data(tok)
    model = common.load_model(seed=args.seed)
    paths = add_sora(model, args.r, args.lora_alpha)
    torch.manual_seed(args.seed)
    for path in paths:  # re-init A in a fixed order after the head, for reproducibility
        nn.init.kaiming_uniform_(common.get_module(model, path).lora.lora_A, a=math.sqrt(5))

    gates = [common.get_module(model, p).lora.gate for p in paths]
    ab = [t for p in paths for t in (common.get_module(model, p).lora.lora_A,
                                     common.get_module(model, p).lora.lora_B)]
    head = [model.classifier.weight, model.classifier.bias]
    opt = torch.optim.AdamW([{"params": ab, "weight_decay": 0.0},
                             {"params": head, "weight_decay": 0.01}], lr=args.lr)

    steps_per_epoch = math.ceil(len(data["train"][2]) / common.BATCH_SIZE)
    total = steps_per_epoch * args.epochs
    warm = int(0.06 * total)
    xi_start, xi_full = int(args.xi_warmup * total), max(1, int(args.xi_ramp * total))

    def xi_at(step):
        if step < xi_start:
            return 0.0
        return args.xi * min(1.0, (step - xi_start + 1) / max(1, xi_full - xi_start))

    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    step = 0
    for epoch in range(args.epochs):
        run_loss = 0.0
        for b in common.batches(data["train"], common.BATCH_SIZE, shuffle=True, generator=gen):
            f = common.linear_schedule(step, total, warm)
            for g in opt.param_groups:
                g["lr"] = args.lr * f
            loss = model(**b).loss
            opt.zero_grad(set_to_none=True)
            for g in gates:
                g.grad = None
            loss.backward()
            opt.step()
            # SoRA's proximal gate step: SGD, then soft-threshold with xi
            xi = xi_at(step)
            with torch.no_grad():
                for g in gates:
                    g.add_(g.grad, alpha=-args.gate_lr * f)
                    if xi > 0:  # shift towards 0 by xi, then |g| < xi -> exactly 0.0
                        g.sub_(xi * torch.sign(g))
                        g.masked_fill_(g.abs() < xi, 0.0)
            run_loss += float(loss.detach())
            step += 1
        zeros = sum(int((g == 0).sum()) for g in gates)
        print(f"epoch {epoch + 1}: loss {run_loss / steps_per_epoch:.4f}  xi {xi_at(step - 1):.4g}  "
              f"zero gates {zeros}/{len(gates) * args.r}  [{timer()} s]", flush=True)

    ev = common.evaluate(model, data["eval"])
    acc = ev["accuracy"]
    ranks = {p: int((common.get_module(model, p).lora.gate != 0).sum()) for p in paths}
    live = sum(ranks.values())
    print(f"eval accuracy {acc:.4f}; live ranks {live}/{len(paths) * args.r}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    sd = {k: v.detach().to(torch.float32).contiguous().clone()
          for k, v in model.state_dict().items() if ".lora." in k}
    assert len(sd) == 3 * len(paths)
    torch.save(sd, os.path.join(args.out, "pytorch_model.bin"))
    common.write_json(os.path.join(args.out, "lora_config.json"),
                      {"lora_r": args.r, "lora_alpha": int(args.lora_alpha)})
    from safetensors.torch import save_file
    save_file({"classifier.weight": model.classifier.weight.detach().contiguous().clone(),
               "classifier.bias": model.classifier.bias.detach().contiguous().clone()},
              os.path.join(args.out, "head.safetensors"))
    gate_vals = torch.cat([g.detach().flatten() for g in gates])
    common.write_json(os.path.join(args.out, "train_log.json"), {
        "method": "SoRA",
        "base_model": common.BASE_MODEL_NAME,
        "data": "examples/data/sentiment",
        "hyper_parameters": {
            "seed": args.seed, "epochs": args.epochs, "batch_size": common.BATCH_SIZE,
            "max_len": common.MAX_LEN, "lora_r": args.r, "lora_alpha": args.lora_alpha,
            "lr_adamw": args.lr, "lr_schedule": f"linear warm-up {warm} steps, linear decay to 10%",
            "gate_optimizer": "SGD step, then shift by -xi*sign(g) and set |g| < xi to 0.0",
            "gate_lr": args.gate_lr, "xi": args.xi,
            "xi_schedule": f"0 for steps < {xi_start}, linear to {args.xi} at step {xi_full}, then constant",
            "target_modules": common.LINEAR_PATHS,
        },
        "steps": step,
        "eval_accuracy": acc,
        "eval_mean_margin": ev["mean_margin"],
        "eval_mean_abs_margin": ev["mean_abs_margin"],
        "eval_predicted_positive": ev["predicted_positive"],
        "wall_seconds": timer(),
        "ranks_total_max": len(paths) * args.r,
        "ranks_live": live,
        "gates_exactly_zero": int((gate_vals == 0).sum()),
        "min_abs_live_gate": float(gate_vals[gate_vals != 0].abs().min()) if live else None,
        "per_module_rank": ranks,
    })
    print(f"saved to {args.out} [{timer()} s]")


if __name__ == "__main__":
    main()
