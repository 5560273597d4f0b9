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
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import methods  # noqa: E402  (IncreLoRA layer, importance and rank allocation)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_run_args(ap, "increlora")
    ap.add_argument("--full-model", action="store_true",
                    help="also save every base tensor (IncreLoRA's full-model checkpoint, ~90 MB)")
    methods.add_increlora_args(ap, lr=5e-3, lr_help="AdamW lr for lora_A/lora_B/head", lr_e=5e-2,
                               budget=144, budget_help="total active ranks (36 modules x 4)",
                               delta_t=8, top_k=9)
    args = ap.parse_args()

    timer, data, model = common.start_run(args)
    paths = common.target_paths()
    torch.manual_seed(args.seed)
    mods = methods.add_svd_linears(model, paths, args.r0, args.lora_alpha, common.set_module)

    head = [model.classifier.weight, model.classifier.bias]
    opt = torch.optim.AdamW(methods.svd_param_groups(mods, args.lr, args.lr_e)
                            + [{"params": head, "weight_decay": 0.01, "base_lr": args.lr}], lr=args.lr)

    steps_per_epoch, total, warm = common.epoch_schedule(data, args.epochs)
    importance = methods.Importance(mods, args.beta1, args.beta2)

    alloc = methods.RankAllocator.from_args(mods, paths, args)
    step = 0
    for epoch, train_batches in common.train_epochs(model, data, args.epochs, args.seed):
        run_loss = 0.0
        for b in train_batches:
            f = common.schedule_lr(opt, step, total, warm)
            loss = model(**b).loss
            reg, scores = methods.increlora_backward_step(opt, mods, importance, loss, args.orth_reg)
            run_loss += float(loss.detach())
            step += 1
            alloc.after_step(step, scores, opt, f)  # incremental allocation
        print(f"epoch {epoch + 1}: loss {run_loss / steps_per_epoch:.4f}  active ranks {alloc.active}  "
              f"[{timer()} s]", flush=True)

    ev = common.evaluate(model, data["eval"])
    acc = ev["accuracy"]
    ranks, live, entries = methods.increlora_ranks(mods)
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
    methods.write_increlora_config(args.out, cfg, "query,key,value,intermediate,layer.output,attention.output",
                                   args.lora_alpha, args.r0, ranks)
    common.write_json(os.path.join(args.out, "train_log.json"), {
        "method": "IncreLoRA",
        "base_model": common.BASE_MODEL_NAME,
        "data": "examples/data/sentiment",
        "hyper_parameters": {
            "seed": args.seed, "epochs": args.epochs, "batch_size": common.BATCH_SIZE,
            "max_len": common.MAX_LEN, "train_texts": len(data["train"][2]),
            **methods.increlora_hparams(args, warm), "full_model_saved": args.full_model,
            "target_modules": common.LINEAR_PATHS,
        },
        "steps": step,
        **common.eval_log(ev),
        "wall_seconds": timer(),
        **methods.increlora_rank_log(paths, args.r0, ranks, live, entries, alloc.allocations),
    })
    print(f"saved to {args.out} ({len(sd)} tensors) [{timer()} s]")


if __name__ == "__main__":
    main()
