#!/usr/bin/env python3
"""Make the small causal-LM text set for the Gemma 3 270M example adapters.

Stdlib only and fully deterministic (fixed seed): running it again rewrites
byte-identical files. Input: the review sentences of examples/data/sentiment/.

    python examples/data/make_gemma_text.py            # writes examples/data/gemma_text/
    python examples/data/make_gemma_text.py --out DIR

Output (UTF-8, one sentence per line, "\\n" line ends):
  positive_train.txt  N_TRAIN_PER_LABEL positive sentences from sentiment/train.jsonl
  negative_train.txt  N_TRAIN_PER_LABEL negative sentences from sentiment/train.jsonl
  eval.txt            N_EVAL_PER_LABEL positive + N_EVAL_PER_LABEL negative sentences from
                      sentiment/eval.jsonl (held out: never in train.jsonl), shuffled together
  eval_labels.txt     one label per line of eval.txt: 1 = positive, 0 = negative
  README.md
"""
import argparse
import json
import os
import random

SEED = 20261124
N_TRAIN_PER_LABEL = 600
N_EVAL_PER_LABEL = 32

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "sentiment")

README = """# gemma_text: a short-text causal-LM task for the Gemma 3 270M example adapters

Made by `examples/data/make_gemma_text.py` (stdlib, seed {seed}, deterministic) from the
review sentences of `examples/data/sentiment/` (templated, synthetic; see its README).

| file | lines | content |
|---|---|---|
| `positive_train.txt` | {n_train} | positive sentences (label 1) of `sentiment/train.jsonl` |
| `negative_train.txt` | {n_train} | negative sentences (label 0) of `sentiment/train.jsonl` |
| `eval.txt` | {n_eval2} | {n_eval} positive + {n_eval} negative sentences of `sentiment/eval.jsonl`, mixed |
| `eval_labels.txt` | {n_eval2} | label of the same line of `eval.txt`: 1 positive, 0 negative |

`eval.jsonl` and `train.jsonl` share no sentence, so `eval.txt` is held out from both
training files. Used by `examples/train_sora_gemma.py` (causal-LM loss on the positive
sentences), `examples/train_increlora_gemma.py` (on the negative ones) and
`examples/check_gemma_examples.py` (perplexity on the positive / negative lines of
`eval.txt`, and the KL divergence of every adapted next-token distribution from the base
one on all lines).
"""


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def pick(rows, label, n, rng):
    texts = [r["text"].strip() for r in rows if r["label"] == label]
    texts = list(dict.fromkeys(t for t in texts if t and "\n" not in t))  # unique, in order
    if len(texts) < n:
        raise SystemExit(f"only {len(texts)} sentences with label {label}, need {n}")
    return rng.sample(texts, n)


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(f"{line}\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "gemma_text"))
    args = ap.parse_args()
    rng = random.Random(SEED)
    train = read_jsonl(os.path.join(SRC, "train.jsonl"))
    ev = read_jsonl(os.path.join(SRC, "eval.jsonl"))
    pos = pick(train, 1, N_TRAIN_PER_LABEL, rng)
    neg = pick(train, 0, N_TRAIN_PER_LABEL, rng)
    ev_rows = ([(t, 1) for t in pick(ev, 1, N_EVAL_PER_LABEL, rng)]
               + [(t, 0) for t in pick(ev, 0, N_EVAL_PER_LABEL, rng)])
    rng.shuffle(ev_rows)
    assert not {t for t, _ in ev_rows} & set(pos + neg)
    os.makedirs(args.out, exist_ok=True)
    write_lines(os.path.join(args.out, "positive_train.txt"), pos)
    write_lines(os.path.join(args.out, "negative_train.txt"), neg)
    write_lines(os.path.join(args.out, "eval.txt"), [t for t, _ in ev_rows])
    write_lines(os.path.join(args.out, "eval_labels.txt"), [str(lab) for _, lab in ev_rows])
    with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8", newline="\n") as f:
        f.write(README.format(seed=SEED, n_train=N_TRAIN_PER_LABEL, n_eval=N_EVAL_PER_LABEL,
                              n_eval2=2 * N_EVAL_PER_LABEL))
    print(f"wrote {args.out}: {len(pos)} positive, {len(neg)} negative train sentences, "
          f"{len(ev_rows)} eval sentences")


if __name__ == "__main__":
    main()
