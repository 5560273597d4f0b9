#!/usr/bin/env python3
"""Train a real Bayesian-LoRA adapter (rank gates + Bayesian-Bits weight quantization) on
all-MiniLM-L6-v2 for the shipped sentiment data, on CPU, and save it in the layout of the
``blora`` tuner of KseniaSycheva/peft (Bayesian-LoRA's second author's PEFT fork).

    python examples/train_blora.py --out examples/adapters/blora

Mechanism (Meo et al. 2024 + Bayesian Bits, van Baalen et al. 2020; written from the
formulas, no upstream code). Per adapted Linear, SVD form with ``prune_rank``:
``lora_A [r,in]``, ``lora_E [r,1]``, ``lora_B [out,r]``, r = 8, lora_alpha = 16,
``dW = (lora_alpha/r) * B @ diag(E * mask) @ A``.

* Rank gates: hard-concrete (beta = 2/3, gamma = -0.1, zeta = 1.1) log-alphas ``gamma_2 [r-1]``
  kept in ``lora_E_quantizer.quantizer``; NESTED: ``mask = [1, cumprod(z)]``. Training samples
  z from the hard-concrete distribution; eval uses the deterministic test rule
  ``z = 1 iff log_alpha > TEST_THRESHOLD (-0.9353, the value in shared/adapter-formats.md)``.
* Bit gates: for each weight quantizer (lora_A, lora_B, lora_E) hard-concrete gates
  gamma_4, gamma_8, gamma_16, gamma_32 ``[1]``; nested residual quantization
  ``x_q = x_2 + z4 (x_4 + z8 (x_8 + z16 (x_16 + z32 x_32)))``, where ``x_2 = q_2(x)`` and
  ``x_b = q_b(x) - q_{b/2}(x)`` is the residual error quantized on the b-bit grid, i.e.
  ``q_b(x) = s_b * clamp(round(x / s_b), -(2^(b-1)-1), 2^(b-1)-1)``,
  ``s_b = (x_max - x_min) / (2^b - 1)`` with the symmetric range ``x_max = -x_min = max|x|``
  taken from the tensor itself (every forward, detached; so a reader rebuilds it from the
  saved tensor); rounding uses the straight-through estimator.
  Weight tensors are always treated as signed (symmetric grid, zero point 0).
* Loss: task cross-entropy + expected-L0 (Bayesian-Bits) penalties: rank gates
  ``lambda_rank * mean_modules(sum_i prod_{j<=i} P(z_j != 0)) / (r-1)`` and bit gates
  ``quantization_lmbd * mean_quantizers(sum_b (b/32) prod_{b'<=b} P(z_b' != 0)) / (60/32)``
  (bigger bit-widths cost more); both ramp in linearly after a warm-up.
* Activation quantizers (lora_A_act, lora_E_act, lora_AB_act) are present with their gates at
  init, not trained and not applied (informative only), but their gamma keys are saved.

Output folder (PEFT layout, peft_type BLORA):
  adapter_config.json        LoRA fields + quantize / prune_rank / n_bits / quantization_lmbd /
                             gamma_{4,8,16,32}_init / learn_gates / learn_scales / scales_type ...
  adapter_model.safetensors  base_model.model.<P>.lora_A / lora_E / lora_B,
                             <P>.lora_E_quantizer.quantizer.gamma_2 [r-1],
                             <P>.<T>_quantizer.quantizer.gamma_{4,8,16,32} [1]
                             (T in lora_A, lora_B, lora_E, lora_A_act, lora_E_act, lora_AB_act),
                             base_model.model.classifier.weight / .bias
  train_log.json             hyper-parameters, steps, eval accuracy (float and quantized),
                             wall time, per-module effective rank and learned bits
"""
import argparse
import math
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

HC_BETA, HC_GAMMA, HC_ZETA = 2.0 / 3.0, -0.1, 1.1
# log-alpha offset of P(z != 0) = sigmoid(log_alpha - beta*ln(-gamma/zeta))
HC_LOG_RATIO = HC_BETA * math.log(-HC_GAMMA / HC_ZETA)
# deterministic test rule, as stated in shared/adapter-formats.md
TEST_THRESHOLD = -0.9353
BITS = (4, 8, 16, 32)
WEIGHT_Q = ("lora_A", "lora_B", "lora_E")
ACT_Q = ("lora_A_act", "lora_E_act", "lora_AB_act")


def hc_sample(log_alpha):
    u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / HC_BETA)
    return (s * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0.0, 1.0)


def hc_test(log_alpha):
    return (log_alpha > TEST_THRESHOLD).to(log_alpha.dtype)


def hc_prob_open(log_alpha):
    return torch.sigmoid(log_alpha - HC_LOG_RATIO)


def round_ste(x):
    return x + (torch.round(x) - x).detach()


def grid_quantize(x, bits, m):
    """Symmetric b-bit grid of range [-m, m]: s_b = 2m / (2^b - 1), levels +-(2^(b-1)-1)."""
    s = 2 * m / (2 ** bits - 1)
    n = 2 ** (bits - 1) - 1
    return s * torch.clamp(round_ste(x / s), -n, n)


def bb_quantize(x, z):
    """Nested residual quantization; z = [z4, z8, z16, z32] (0-d tensors or floats)."""
    m = x.detach().abs().max()
    if float(m) == 0.0:
        return x
    q = {b: grid_quantize(x, b, m) for b in (2,) + BITS}
    xr = {b: q[b] - q[b // 2] for b in BITS}
    inner = z[3] * xr[32]
    inner = z[2] * (xr[16] + inner)
    inner = z[1] * (xr[8] + inner)
    inner = z[0] * (xr[4] + inner)
    return q[2] + inner


class BBGates(nn.Module):
    """``<T>_quantizer.quantizer``: the Bayesian-Bits gates (and rank gates for lora_E)."""

    def __init__(self, inits, rank_gates=0, rank_init=3.0, trainable=True):
        super().__init__()
        for b, v in zip(BITS, inits):
            setattr(self, f"gamma_{b}", nn.Parameter(torch.full((1,), float(v)), requires_grad=trainable))
        if rank_gates:
            self.gamma_2 = nn.Parameter(torch.full((rank_gates,), float(rank_init)), requires_grad=trainable)

    def bit_gammas(self):
        return [getattr(self, f"gamma_{b}") for b in BITS]

    def bit_gates(self, training):
        return [(hc_sample(g) if training else hc_test(g))[0] for g in self.bit_gammas()]

    def rank_mask(self, training):
        z = hc_sample(self.gamma_2) if training else hc_test(self.gamma_2)
        return torch.cat([torch.ones(1), torch.cumprod(z, 0)])

    def learned_bits(self):
        n = 0
        for g in self.bit_gammas():
            if float(g.detach()) <= TEST_THRESHOLD:
                break
            n += 1
        return 2 * 2 ** n


class Quantizer(nn.Module):
    def __init__(self, gates):
        super().__init__()
        self.quantizer = gates


class BLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r, lora_alpha, gamma_inits, rank_init):
        super().__init__()
        self.base_layer = base
        self.r, self.scaling = r, lora_alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_E = nn.Parameter(torch.ones(r, 1))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_A_quantizer = Quantizer(BBGates(gamma_inits))
        self.lora_B_quantizer = Quantizer(BBGates(gamma_inits))
        self.lora_E_quantizer = Quantizer(BBGates(gamma_inits, rank_gates=r - 1, rank_init=rank_init))
        for t in ACT_Q:  # informative only: stay at init, not applied
            setattr(self, f"{t}_quantizer", Quantizer(BBGates(gamma_inits, trainable=False)))
        self.quantize = True

    def weights(self, training, quantize):
        A, E, B = self.lora_A, self.lora_E, self.lora_B
        if quantize:
            A = bb_quantize(A, self.lora_A_quantizer.quantizer.bit_gates(training))
            B = bb_quantize(B, self.lora_B_quantizer.quantizer.bit_gates(training))
            E = bb_quantize(E, self.lora_E_quantizer.quantizer.bit_gates(training))
        mask = self.lora_E_quantizer.quantizer.rank_mask(training)
        return A, E[:, 0] * mask, B

    def forward(self, x):
        A, e, B = self.weights(self.training, self.quantize)
        return self.base_layer(x) + ((x @ A.t()) * e) @ B.t() * self.scaling

    def penalties(self):
        q = hc_prob_open(self.lora_E_quantizer.quantizer.gamma_2)
        rank = torch.cumprod(q, 0).sum() / (self.r - 1)
        bit_w = torch.tensor([b / 32 for b in BITS])
        bits = []
        for t in WEIGHT_Q:
            g = torch.cat(getattr(self, f"{t}_quantizer").quantizer.bit_gammas())
            bits.append((torch.cumprod(hc_prob_open(g), 0) * bit_w).sum() / bit_w.sum())
        return rank, torch.stack(bits)

    def effective_rank(self):
        return int(self.lora_E_quantizer.quantizer.rank_mask(False).sum())


def set_quantize(mods, flag):
    for m in mods.values():
        m.quantize = flag


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_run_args(ap, "blora")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16)
    ap.add_argument("--lr", type=float, default=2e-3, help="AdamW lr for lora_A/E/B and the head")
    ap.add_argument("--gates-lr", type=float, default=0.1, help="Adam lr of the gate log-alphas")
    ap.add_argument("--gamma-init", type=float, default=6.0, help="gamma_{4,8,16,32} init")
    ap.add_argument("--rank-gate-init", type=float, default=3.0, help="gamma_2 init")
    ap.add_argument("--quantization-lmbd", type=float, default=0.05, help="bit-gate L0 weight")
    ap.add_argument("--rank-lmbd", type=float, default=0.5, help="rank-gate L0 weight")
    ap.add_argument("--penalty-start", type=float, default=0.1, help="fraction of steps before the penalty")
    ap.add_argument("--penalty-ramp", type=float, default=0.3, help="fraction of steps when it is full")
    ap.add_argument("--clip", type=float, default=1.0, help="grad-norm clip of LoRA weights + head")
    ap.add_argument("--float-train", action="store_true", help="debug: train without quantizers")
    args = ap.parse_args()

    timer, data, model = common.start_run(args)
    paths = common.target_paths()
    torch.manual_seed(args.seed)
    inits = [args.gamma_init] * 4
    mods = {}
    for path in paths:
        mods[path] = BLoRALinear(common.get_module(model, path), args.r, args.lora_alpha,
                                 inits, args.rank_gate_init)
        common.set_module(model, path, mods[path])
    set_quantize(mods, not args.float_train)

    weights = [p for m in mods.values() for p in (m.lora_A, m.lora_E, m.lora_B)]
    gates = [p for m in mods.values() for t in WEIGHT_Q
             for p in getattr(m, f"{t}_quantizer").parameters()]
    head = [model.classifier.weight, model.classifier.bias]
    opt = torch.optim.AdamW([{"params": weights, "weight_decay": 0.0, "base_lr": args.lr, "sched": True},
                             {"params": head, "weight_decay": 0.01, "base_lr": args.lr, "sched": True},
                             {"params": gates, "weight_decay": 0.0, "base_lr": args.gates_lr,
                              "sched": False}],
                            lr=args.lr)

    steps_per_epoch, total, warm = common.epoch_schedule(data, args.epochs)
    p0, p1 = int(args.penalty_start * total), max(1, int(args.penalty_ramp * total))

    def pen_w(step):
        return 0.0 if step < p0 else min(1.0, (step - p0 + 1) / max(1, p1 - p0))

    step = 0
    for epoch, train_batches in common.train_epochs(model, data, args.epochs, args.seed):
        run = [0.0, 0.0, 0.0]
        for b in train_batches:
            common.schedule_lr(opt, step, total, warm)
            loss = model(**b).loss
            pr = [m.penalties() for m in mods.values()]
            rank_pen = torch.stack([p[0] for p in pr]).mean()
            bit_pen = torch.cat([p[1] for p in pr]).mean()
            w = pen_w(step)
            total_loss = loss + w * (args.rank_lmbd * rank_pen + args.quantization_lmbd * bit_pen)
            opt.zero_grad(set_to_none=True)
            total_loss.backward()
            torch.nn.utils.clip_grad_norm_(weights + head, args.clip)
            opt.step()
            run[0] += float(loss.detach())
            run[1] += float(rank_pen.detach())
            run[2] += float(bit_pen.detach())
            step += 1
        eff = sum(m.effective_rank() for m in mods.values())
        bits = [getattr(m, f"{t}_quantizer").quantizer.learned_bits() for m in mods.values() for t in WEIGHT_Q]
        print(f"epoch {epoch + 1}: loss {run[0] / steps_per_epoch:.4f}  E[L0] rank {run[1] / steps_per_epoch:.3f}"
              f"  bits {run[2] / steps_per_epoch:.3f}  test-time ranks {eff}/{len(mods) * args.r}"
              f"  bits hist { {b: bits.count(b) for b in sorted(set(bits))} }  [{timer()} s]", flush=True)

    set_quantize(mods, False)
    ev_f = common.evaluate(model, data["eval"])
    set_quantize(mods, True)
    ev_q = common.evaluate(model, data["eval"])
    set_quantize(mods, False)
    ranks = {p: m.effective_rank() for p, m in mods.items()}
    bits = {p: {t: getattr(m, f"{t}_quantizer").quantizer.learned_bits() for t in WEIGHT_Q}
            for p, m in mods.items()}
    print(f"eval accuracy (test-time gates, float) {ev_f['accuracy']:.4f}; "
          f"with learned quantization {ev_q['accuracy']:.4f}; "
          f"effective ranks {sum(ranks.values())}/{len(paths) * args.r}", flush=True)

    # ---- save in the blora PEFT layout
    os.makedirs(args.out, exist_ok=True)
    sd = {}
    for path, m in mods.items():
        for name, t in m.named_parameters():
            if "lora_" in name:
                sd[f"base_model.model.{path}.{name}"] = t.detach().to(torch.float32).contiguous().clone()
    sd["base_model.model.classifier.weight"] = model.classifier.weight.detach().contiguous().clone()
    sd["base_model.model.classifier.bias"] = model.classifier.bias.detach().contiguous().clone()
    from safetensors.torch import save_file
    save_file(sd, os.path.join(args.out, "adapter_model.safetensors"), metadata={"format": "pt"})

    # PEFT LoraConfig fields (as the 2024 fork's BLoraConfig(LoraConfig) writes them) + blora fields
    cfg = {
        "peft_type": "BLORA", "task_type": "SEQ_CLS",
        "base_model_name_or_path": common.BASE_MODEL_NAME, "revision": None, "inference_mode": True,
        "r": args.r, "lora_alpha": int(args.lora_alpha), "lora_dropout": 0.0,
        "target_modules": ["query", "key", "value", "attention.output.dense",
                           "intermediate.dense", "output.dense"],
        "modules_to_save": ["classifier"], "fan_in_fan_out": False, "bias": "none",
        "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "quantize": True, "prune_rank": True, "n_bits": 32,
        "quantization_lmbd": args.quantization_lmbd,
        "gamma_4_init": args.gamma_init, "gamma_8_init": args.gamma_init,
        "gamma_16_init": args.gamma_init, "gamma_32_init": args.gamma_init,
        "learn_gates": True, "learn_scales": False, "scales_type": "range",
        "gates_lr": args.gates_lr, "scales_lr": 0.0,
    }
    common.write_json(os.path.join(args.out, "adapter_config.json"), cfg)

    all_bits = [b for d in bits.values() for b in d.values()]
    gam = torch.cat([t.flatten() for k, t in sd.items() if ".gamma_" in k and "_act_" not in k])
    common.write_json(os.path.join(args.out, "train_log.json"), {
        "method": "Bayesian-LoRA (blora)",
        "base_model": common.BASE_MODEL_NAME,
        "data": "examples/data/sentiment",
        "hyper_parameters": {
            "seed": args.seed, "epochs": args.epochs, "batch_size": common.BATCH_SIZE,
            "max_len": common.MAX_LEN, "train_texts": len(data["train"][2]),
            "r": args.r, "lora_alpha": args.lora_alpha,
            "lr_adamw": args.lr, "grad_clip_norm": args.clip, "lr_schedule": f"linear warm-up {warm} steps, linear decay to 10%",
            "gates_optimizer": "Adam (AdamW, no decay), constant lr", "gates_lr": args.gates_lr,
            "hard_concrete": {"beta": HC_BETA, "gamma": HC_GAMMA, "zeta": HC_ZETA,
                              "test_threshold": TEST_THRESHOLD},
            "gamma_bits_init": args.gamma_init, "gamma_2_init": args.rank_gate_init,
            "quantization_lmbd": args.quantization_lmbd, "rank_lmbd": args.rank_lmbd,
            "penalty_schedule": f"0 before step {p0}, linear to full at step {p1}",
            "rank_penalty": "rank_lmbd * mean_modules(sum_i prod_{j<=i} P(z_j!=0)) / (r-1)",
            "bit_penalty": "quantization_lmbd * mean_weight_quantizers(sum_b (b/32) prod_{b'<=b} "
                           "P(z_b'!=0)) / (60/32)",
            "quantization": "nested residual, symmetric grid from the tensor's own max|x| "
                            "(recomputed every forward), STE rounding; weights only",
            "activation_quantizers": "gates kept at init, not applied",
            "target_modules": common.LINEAR_PATHS,
        },
        "steps": step,
        **common.eval_log(ev_f),
        "eval_accuracy_quantized": ev_q["accuracy"],
        "eval_mean_margin_quantized": ev_q["mean_margin"],
        "eval_mean_abs_margin_quantized": ev_q["mean_abs_margin"],
        "wall_seconds": timer(),
        "ranks_total_max": len(paths) * args.r,
        "ranks_effective": sum(ranks.values()),
        "bits_histogram": {str(b): all_bits.count(b) for b in sorted(set(all_bits))},
        "weight_gate_log_alphas_in_(-2,0]": int(((gam > -2) & (gam <= 0)).sum()),
        # beta*ln(-gamma/zeta) with beta = 2/3 is -1.5986, not the -0.9353 of the formats doc;
        # gates in between are "off" under the doc's rule and "on" under the -1.5986 rule
        "weight_gate_log_alphas_in_(-1.5986,-0.9353]": int(((gam > HC_LOG_RATIO) & (gam <= TEST_THRESHOLD)).sum()),
        "per_module_rank": ranks,
        "per_module_bits": bits,
    })
    print(f"saved to {args.out} ({len(sd)} tensors) [{timer()} s]")


if __name__ == "__main__":
    main()
