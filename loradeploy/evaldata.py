"""Evaluation inputs: JSON lines with ``text`` and, optionally, an integer ``label``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import EvalDataError

#: tokens per input text: longer texts are truncated to this wherever they are tokenized (the
#: fp32 reference, the artifact's session, the calibration of a plan)
MAX_LENGTH = 128

#: The example evaluation sets shipped with the tool: sentiment classification (500 held-back
#: sentences) and, for language models, held-back review sentences as plain text.
DEFAULT_EVAL = Path(__file__).resolve().parent / "data" / "sentiment" / "eval.jsonl"
DEFAULT_LM_EVAL = Path(__file__).resolve().parent / "data" / "gemma_text" / "eval.txt"
#: Calibration inputs for quantization plans: the examples' training texts, never the eval sets.
DEFAULT_CALIBRATION = Path(__file__).resolve().parent / "data" / "sentiment" / "train.jsonl"
DEFAULT_LM_CALIBRATION = (Path(__file__).resolve().parent / "data" / "gemma_text" / "positive_train.txt",
                          Path(__file__).resolve().parent / "data" / "gemma_text" / "negative_train.txt")


@dataclass(frozen=True)
class EvalSet:
    path: Path
    texts: list[str]
    labels: list[int] | None  # None when not every line has a label


def load_eval(path: Path | None = None, limit: int | None = None, lm: bool = False) -> EvalSet:
    """Read an eval file: JSON lines ``{text, label}`` or, ``.txt``, one text per line (default:
    :data:`DEFAULT_EVAL`, or :data:`DEFAULT_LM_EVAL` with ``lm``); one clear error per bad line."""
    path = Path(path) if path else (DEFAULT_LM_EVAL if lm else DEFAULT_EVAL)
    if not path.is_file():
        raise EvalDataError(f"{path}: no such eval file")
    texts, labels = [], []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EvalDataError(f"{path}: cannot read ({e})") from e
    if path.suffix == ".txt":  # plain text, one input per line (language-model eval)
        texts = [ln for ln in lines if ln.strip()][:limit]
        if not texts:
            raise EvalDataError(f"{path}: no eval inputs")
        return EvalSet(path, texts, None)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{path}:{n}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"]:
            raise EvalDataError(f"{path}:{n}: expected an object with a non-empty \"text\"")
        label = obj.get("label")
        if label is not None and (not isinstance(label, int) or isinstance(label, bool) or label < 0):
            raise EvalDataError(f"{path}:{n}: \"label\" must be a non-negative integer, got {label!r}")
        texts.append(obj["text"])
        labels.append(label)
    if not texts:
        raise EvalDataError(f"{path}: no eval inputs")
    if limit:
        texts, labels = texts[:limit], labels[:limit]
    return EvalSet(path, texts, labels if all(lb is not None for lb in labels) else None)


def load_calibration(path: Path | None, limit: int, lm: bool = False) -> EvalSet:
    """Calibration texts for a quantization plan: ``path`` (same formats as eval files) or the
    examples' training texts (for language models, alternating between the two text files)."""
    if path is not None:
        return load_eval(path, limit, lm)
    if not lm:
        return load_eval(DEFAULT_CALIBRATION, limit)
    parts = [load_eval(p, limit, lm=True).texts for p in DEFAULT_LM_CALIBRATION]
    texts = [t for pair in zip(*parts) for t in pair][:limit]
    return EvalSet(DEFAULT_LM_CALIBRATION[0].parent, texts, None)


def shipped_set_note(eval_set: EvalSet, base_dir: Path) -> str | None:
    """A note when ``eval_set`` is a shipped set and ``base_dir`` is not the base it was made for:
    fidelity against the reference is still measured, task measures on it mean little."""
    from .base import resolve_base

    made_for = {DEFAULT_EVAL.resolve(): "minilm", DEFAULT_LM_EVAL.resolve(): "gemma3-270m"}.get(Path(eval_set.path).resolve())
    if made_for is None:
        return None
    try:
        same = Path(resolve_base(made_for)).resolve() == Path(base_dir).resolve()
    except Exception:  # noqa: BLE001 - the alias's package missing: then it is not this base
        same = False
    if same:
        return None
    if made_for == "minilm":
        return ("the shipped sentiment eval set was made for the minilm examples: fidelity against the fp32 "
                "reference is measured, but accuracy on it says nothing about this base (pass --eval)")
    return ("the shipped Gemma text eval set was made for gemma3-270m: KL and top-1 against the fp32 reference are "
            "measured, perplexity on it is not a task measure for this base (pass --eval)")


def length_order(tokenizer, texts: list[str], max_length: int = MAX_LENGTH):
    """The order of ``texts`` by token count (stable): batches of similar lengths pad less, and
    every padded position costs a forward pass as much as a real token (the 500-text eval set:
    10,724 positions padded in text order, 7,988 in this order, 7,709 real; the 64 calibration
    texts: 1,408 and 1,248 for 984)."""
    import numpy as np

    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return np.argsort(np.array([len(x) for x in ids], dtype=np.int64), kind="stable")
