#!/usr/bin/env python3
"""Make the small, templated binary sentiment data set shipped with the examples.

Stdlib only and fully deterministic (fixed seed): running it again rewrites
byte-identical files.

    python examples/data/make_sentiment.py            # writes examples/data/sentiment/
    python examples/data/make_sentiment.py --out DIR

Each line of train.jsonl / eval.jsonl is {"text": str, "label": 0|1}
(0 = negative, 1 = positive). Sentences are product / movie / restaurant reviews
built from templates with varied vocabulary, negation ("not good", "hardly worth
it", "never disappointing") and contrast ("..., but ...", "although ..., ...",
where the clause after the contrast decides the label), so that a frozen sentence
encoder plus a linear head is not enough and fine-tuning matters.
"""
import argparse
import json
import os
import random

SEED = 20240611
N_TRAIN_PER_LABEL = 1000
N_EVAL_PER_LABEL = 250

# ---------------------------------------------------------------- vocabulary
SUBJECTS = {
    "movie": ["movie", "film", "plot", "acting", "script", "soundtrack", "ending",
              "cast", "dialogue", "cinematography", "pacing", "sequel", "lead actor",
              "special effects", "story", "documentary", "director's cut"],
    "product": ["headphones", "blender", "laptop", "battery", "charger", "jacket",
                "vacuum cleaner", "phone", "camera", "keyboard", "backpack", "kettle",
                "mattress", "printer", "coffee maker", "smartwatch", "speaker",
                "running shoes", "desk lamp", "router", "screen", "build quality",
                "packaging", "customer service", "delivery", "manual", "warranty"],
    "restaurant": ["pasta", "service", "soup", "dessert", "staff", "menu", "pizza",
                   "atmosphere", "burger", "coffee", "wine list", "waiter", "curry"],
}
# adjectives that can follow "the X was ..." (positive / negative)
POS_ADJ = ["good", "great", "excellent", "wonderful", "fantastic", "superb", "solid",
           "impressive", "delightful", "enjoyable", "reliable", "charming", "brilliant",
           "pleasant", "outstanding", "lovely", "sturdy", "well made", "fun", "amazing",
           "satisfying", "memorable", "clever", "comfortable", "decent", "helpful",
           "worth it", "worth the money", "a pleasure", "a joy to use"]
NEG_ADJ = ["bad", "terrible", "awful", "disappointing", "boring", "dull", "cheap",
           "flimsy", "annoying", "useless", "mediocre", "poor", "broken", "clumsy",
           "horrible", "tedious", "forgettable", "overpriced", "sloppy", "unreliable",
           "noisy", "bland", "frustrating", "painful", "a waste of money", "a letdown",
           "a mess", "unbearable", "weak", "dreadful"]
INTENS = ["", "", "", "really ", "very ", "truly ", "quite ", "absolutely ",
          "surprisingly ", "pretty ", "incredibly ", "genuinely "]
NEGATORS = ["not ", "not ", "never ", "hardly ", "not at all ", "far from ",
            "by no means ", "not exactly ", "barely "]
POS_VERB = ["loved", "enjoyed", "adored", "liked", "appreciated", "was impressed by",
            "was happy with", "had fun with", "was thrilled with"]
NEG_VERB = ["hated", "disliked", "regretted buying", "was annoyed by",
            "was let down by", "could not stand", "was bored by", "got tired of",
            "was unhappy with"]
NEG_VERB_NEGATED = {  # "I did not <verb>" forms for the negative verbs of liking
    "loved": "love", "enjoyed": "enjoy", "adored": "adore", "liked": "like",
    "appreciated": "appreciate"}
PREFIXES = ["", "", "", "", "Honestly, ", "To be fair, ", "Overall, ", "In my opinion, ",
            "I have to say ", "After a week, ", "Frankly, ", "All in all, ",
            "As a long-time customer, ", "Compared to the last one, ", "I think ",
            "My wife says ", "Sadly or not, ", "For the price, "]
CONTRASTS = [", but ", ", but ", ", but ", ", yet ", "; however, ", ", but in the end "]
ENDINGS = [".", ".", ".", "!", "..."]


def subject(rng):
    domain = rng.choice(sorted(SUBJECTS))
    return rng.choice(SUBJECTS[domain])


PLURAL = {"headphones", "running shoes", "special effects"}


def be(rng, subj):
    return rng.choice(["are", "were"] if subj in PLURAL else ["is", "was"])


def det(rng, subj):
    if subj.startswith("customer"):
        return "the "
    return rng.choice(["the ", "the ", "these " if subj in PLURAL else "this ", "my "])


def clause(rng):
    """Return (text, polarity) for one clause; polarity 1 = positive."""
    kind = rng.random()
    subj = subject(rng)
    the = det(rng, subj)
    if kind < 0.34:  # plain adjective
        pol = rng.randint(0, 1)
        adj = rng.choice(POS_ADJ if pol else NEG_ADJ)
        inten = rng.choice(INTENS) if not adj.startswith(("a ", "worth")) else ""
        return f"{the}{subj} {be(rng, subj)} {inten}{adj}", pol
    if kind < 0.62:  # negated adjective: polarity flips ("not good" -> 0, "never disappointing" -> 1)
        adj_pol = rng.randint(0, 1)
        adj = rng.choice(POS_ADJ if adj_pol else NEG_ADJ)
        neg = rng.choice(NEGATORS)
        v = be(rng, subj)
        if neg == "not " and rng.random() < 0.4:
            return f"{the}{subj} {v}n't {adj}", 1 - adj_pol
        return f"{the}{subj} {v} {neg}{adj}", 1 - adj_pol
    if kind < 0.80:  # verb of liking / disliking, optionally negated
        if rng.random() < 0.3:
            verb = rng.choice(sorted(NEG_VERB_NEGATED))
            aux = rng.choice(["did not", "didn't", "never really", "could not"])
            return f"I {aux} {NEG_VERB_NEGATED[verb]} {the}{subj}", 0
        pol = rng.randint(0, 1)
        verb = rng.choice(POS_VERB if pol else NEG_VERB)
        adv = rng.choice(["", "", "really ", "absolutely ", "honestly "]) if " " not in verb else ""
        return f"I {adv}{verb} {the}{subj}", pol
    if kind < 0.92:  # worth / recommend
        opts = [
            ("it is worth every penny", 1), ("it was worth the wait", 1),
            ("I would recommend it to anyone", 1), ("I would buy it again", 1),
            ("I will definitely come back", 1), ("it never disappoints", 1),
            ("it is hardly worth it", 0), ("it was not worth the money", 0),
            ("I would not recommend it", 0), ("I would never buy it again", 0),
            ("I will not be coming back", 0), ("it always disappoints", 0),
            ("I can't recommend it enough", 1), ("I can't recommend it", 0),
            ("nobody should waste time on it", 0), ("nothing about it felt cheap", 1),
            ("there was nothing to complain about", 1), ("there was nothing to like", 0),
            ("I returned it the next day", 0), ("I kept smiling the whole time", 1),
            ("I want my money back", 0), ("it exceeded my expectations", 1),
            ("it fell short of my expectations", 0), ("it did not disappoint", 1),
            ("it never once let me down", 1), ("it barely works", 0),
        ]
        return rng.choice(opts)
    # "could not be happier" style
    opts = [("I could not be happier with the {s}", 1), ("I could not be more disappointed with the {s}", 0),
            ("no complaints about the {s}", 1), ("no way I would use the {s} again", 0),
            ("the {s} works like a charm", 1), ("the {s} stopped working after two days", 0),
            ("the {s} did exactly what I hoped", 1), ("the {s} did nothing I hoped", 0),
            ("the {s} left me cold", 0), ("the {s} won me over", 1)]
    text, pol = rng.choice(opts)
    return text.format(s=subj), pol


def sentence(rng):
    """Return (text, label)."""
    r = rng.random()
    if r < 0.45:
        text, label = clause(rng)
        text = rng.choice(PREFIXES) + text
    elif r < 0.85:  # contrast: the clause after "but" decides
        a, pa = clause(rng)
        b, pb = clause(rng)
        for _ in range(20):
            if pa != pb:
                break
            b, pb = clause(rng)
        if pa == pb:  # same polarity: "and" instead of "but"
            text, label = a + rng.choice([", and ", " and "]) + b, pa
        else:
            text, label = a + rng.choice(CONTRASTS) + b, pb
    else:  # "although A, B": B decides
        a, pa = clause(rng)
        b, pb = clause(rng)
        for _ in range(20):
            if pa != pb:
                break
            b, pb = clause(rng)
        lead = rng.choice(["Although ", "Even though ", "While "])
        text, label = lead + a + ", " + b, pb
    text = text[0].upper() + text[1:] + rng.choice(ENDINGS)
    return text, label


def generate(seed=SEED):
    rng = random.Random(seed)
    need = N_TRAIN_PER_LABEL + N_EVAL_PER_LABEL
    by_label = {0: [], 1: []}
    seen = set()
    while min(len(v) for v in by_label.values()) < need:
        text, label = sentence(rng)
        key = text.lower()
        if key in seen or len(by_label[label]) >= need:
            continue
        seen.add(key)
        by_label[label].append(text)
    train, evals = [], []
    for label in (0, 1):
        texts = by_label[label]
        rng.shuffle(texts)
        evals += [{"text": t, "label": label} for t in texts[:N_EVAL_PER_LABEL]]
        train += [{"text": t, "label": label} for t in texts[N_EVAL_PER_LABEL:]]
    rng.shuffle(train)
    rng.shuffle(evals)
    return train, evals


README = """# sentiment: a small templated review-sentiment data set

Made by `examples/data/make_sentiment.py` (Python stdlib only, seed {seed}); running
the script again rewrites these files byte for byte.

| file | lines | label 0 | label 1 |
|---|---|---|---|
| `train.jsonl` | {ntr} | {tr0} | {tr1} |
| `eval.jsonl` | {nev} | {ev0} | {ev1} |

Each line is a JSON object `{{"text": str, "label": 0 | 1}}`:
**0 = negative, 1 = positive** review.

How it is made: short product / movie / restaurant review sentences from templates
with varied vocabulary ({nsubj} subjects, {npos} positive and {nneg} negative
adjectives, intensifiers, openers). A clause can be a plain judgement ("the battery was
really good"), a negated one whose polarity flips ("the plot was not good",
"it is hardly worth it", "the sequel was never disappointing"), a verb of liking or
disliking ("I did not enjoy the soup"), or a set phrase ("I would never buy it again").
About half the sentences join two clauses of opposite polarity by a contrast
("..., but ...", "..., yet ...", "although ..., ...") and then **the clause after the
contrast decides the label**. Labels are balanced; sentences are de-duplicated
(case-insensitive) and no sentence is in both files (the eval sentences are held back
from training).

This is synthetic data for examples and tests only; it says nothing about any real product.
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "sentiment"))
    args = ap.parse_args()
    train, evals = generate()
    assert not ({r["text"].lower() for r in train} & {r["text"].lower() for r in evals})
    os.makedirs(args.out, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        with open(os.path.join(args.out, name), "w", encoding="utf-8", newline="\n") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    cnt = lambda rows, l: sum(r["label"] == l for r in rows)
    with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8", newline="\n") as f:
        f.write(README.format(seed=SEED, ntr=len(train), tr0=cnt(train, 0), tr1=cnt(train, 1),
                              nev=len(evals), ev0=cnt(evals, 0), ev1=cnt(evals, 1),
                              nsubj=sum(len(v) for v in SUBJECTS.values()),
                              npos=len(POS_ADJ), nneg=len(NEG_ADJ)))
    print(f"wrote {len(train)} train / {len(evals)} eval lines to {args.out}")


if __name__ == "__main__":
    main()
