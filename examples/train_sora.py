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
import methods  # noqa: E402  (SoRA layer, gate step, xi schedule)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_run_args(ap, "sora")
    methods.add_sora_args(ap, lr=2e-3, lr_help="AdamW lr for lora_A/lora_B/head", xi=0.008)
    args = ap.parse_args()

    timer, data, model = common.start_run(args)
    paths = methods.add_sora(model, common.target_paths(), args.r, args.lora_alpha)
    torch.manual_seed(args.seed)
    for path in paths:  # re-init A in a fixed order after the head, for reproducibility
        nn.init.kaiming_uniform_(common.get_module(model, path).lora.lora_A, a=math.sqrt(5))

    gates = [common.get_module(model, p).lora.gate for p in paths]
    ab = [t for p in paths for t in (common.get_module(model, p).lora.lora_A,
                                     common.get_module(model, p).lora.lora_B)]
    head = [model.classifier.weight, model.classifier.bias]
    opt = torch.optim.AdamW([{"params": ab, "weight_decay": 0.0, "base_lr": args.lr},
                             {"params": head, "weight_decay": 0.01, "base_lr": args.lr}], lr=args.lr)

    steps_per_epoch, total, warm = common.epoch_schedule(data, args.epochs)
    xi_at, xi_start, xi_full = methods.xi_schedule(args.xi, total, args.xi_warmup, args.xi_ramp)

    step = 0
    for epoch, train_batches in common.train_epochs(model, data, args.epochs, args.seed):
        run_loss = 0.0
        for b in train_batches:
            f = common.schedule_lr(opt, step, total, warm)
            loss = model(**b).loss
            methods.sora_backward_step(opt, gates, loss)
            # SoRA's proximal gate step: SGD, then soft-threshold with xi
            xi = xi_at(step)
            methods.sora_gate_step(gates, args.gate_lr, f, xi)
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

    methods.save_sora(model, args.out, paths, args.r, args.lora_alpha)
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
            "max_len": common.MAX_LEN, "train_texts": len(data["train"][2]),
            "lora_r": args.r, "lora_alpha": args.lora_alpha,
            "lr_adamw": args.lr, "lr_schedule": f"linear warm-up {warm} steps, linear decay to 10%",
            "gate_optimizer": "SGD step, then shift by -xi*sign(g) and set |g| < xi to 0.0",
            "gate_lr": args.gate_lr, "xi": args.xi,
            "xi_schedule": f"0 for steps < {xi_start}, linear to {args.xi} at step {xi_full}, then constant",
            "target_modules": common.LINEAR_PATHS,
        },
        "steps": step,
        **common.eval_log(ev),
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
