"""The fp32 PyTorch reference an artifact is held to: outputs of the base with the adapter as
trained (ΔW merged in float64, then fp32), and of the base alone with only the adapter's extra
tensors (its head), on eval texts tokenized in batches in length order."""

from __future__ import annotations

import copy

import numpy as np
import torch

from .evaldata import MAX_LENGTH, length_order
from .ir import AdapterSet, Task
from .merge import merge_into

BATCH = 32


def tokenize(tokenizer, texts: list[str], max_length: int = MAX_LENGTH):
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def batches(tokenizer, texts: list[str], order: np.ndarray | None = None):
    """(input_ids, attention_mask) batches of ``BATCH`` texts taken in ``order`` (default
    :func:`length_order`); :func:`in_text_order` puts per-batch results back in text order."""
    order = length_order(tokenizer, texts) if order is None else order
    for i in range(0, len(texts), BATCH):
        yield tokenize(tokenizer, [texts[j] for j in order[i:i + BATCH]])


def in_text_order(parts: list[np.ndarray], order: np.ndarray) -> np.ndarray:
    """Per-batch results (rows in ``order``) as one array in the texts' own order."""
    rows = np.concatenate(parts)
    out = np.empty_like(rows)
    out[order] = rows
    return out


@torch.no_grad()
def model_outputs(model, task: Task, tokenizer, texts) -> np.ndarray:
    """Logits (classifier) or mean-pooled embeddings of a PyTorch model on ``texts``."""
    outs, order = [], length_order(tokenizer, texts)
    for ids, mask in batches(tokenizer, texts, order):
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        if task is Task.SEQUENCE_CLASSIFICATION:
            outs.append(out.logits.numpy())
        else:
            m = torch.from_numpy(mask).unsqueeze(-1).float()
            outs.append(((out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)).numpy())
    return in_text_order(outs, order)


def trained_model(base_model, adapters: AdapterSet):
    """A copy of the base with ``adapters`` as trained, ΔW merged in float64 then fp32."""
    return merge_into(copy.deepcopy(base_model), adapters)


def reference_outputs(base_model, adapters: AdapterSet, task: Task, tokenizer, texts) -> np.ndarray:
    """Outputs of the base with ``adapters`` as trained, ΔW merged in float64 then fp32."""
    return model_outputs(trained_model(base_model, adapters), task, tokenizer, texts)


def base_alone_outputs(base_model, adapters: AdapterSet, task: Task, tokenizer, texts) -> np.ndarray:
    """The fp32 base with only the adapter's extra tensors (its head): what the adapter's ΔW
    moves the outputs away from. Computed from the base's features before its head when
    another adapter of the same base and texts ran in this process (see :class:`_BaseFeatures`)."""
    from .merge import load_extras

    cached = _BASE_FEATURES.outputs(base_model, adapters, task, tokenizer, texts)
    if cached is not None:
        return cached
    model = copy.deepcopy(base_model)
    load_extras(model, adapters)
    return model_outputs(model, task, tokenizer, texts)


class _BaseFeatures:
    """What the base alone computes before its task head, kept for the next adapter of the same
    base model object and texts (a process exporting many adapters: ``loradeploy fleet``).

    An adapter whose only extra tensors are its head Linear's weight (and bias) changes the base
    alone's outputs only through that Linear, so they are the head applied to the features that
    reach it, batch by batch — the same products the whole forward computes. An adapter with no
    extra tensors has the base's own outputs. Used only when applying the base's own head to the
    kept features reproduces the base's outputs exactly; anything else runs the whole forward."""

    def __init__(self):
        self._key = None
        self._features = None  # (head module name, [per-batch head inputs], batch order) or None: not usable
        self._outputs = None  # the base's own outputs

    def _head(self, model, adapters: AdapterSet) -> str | None:
        from .merge import is_head_tensor

        params = dict(model.named_parameters())
        prefix = getattr(model, "base_model_prefix", "") or ""
        names = {k if k in params else f"{prefix}.{k}" for k in adapters.extra_tensors}
        modules = {n.rsplit(".", 1)[0] for n in names}
        if len(modules) != 1 or not all(is_head_tensor(model, n) for n in names):
            return None
        (head,) = modules
        module = dict(model.named_modules()).get(head)
        ok = isinstance(module, torch.nn.Linear) and f"{head}.weight" in names and names <= {f"{head}.weight", f"{head}.bias"}
        return head if ok else None

    @torch.no_grad()
    def _capture(self, model, head: str, task: Task, tokenizer, texts) -> None:
        module = dict(model.named_modules())[head]
        feats: list[torch.Tensor] = []
        hook = module.register_forward_pre_hook(lambda _m, args: feats.append(args[0].detach().clone()))
        try:
            self._outputs = model_outputs(model, task, tokenizer, texts)
        finally:
            hook.remove()
        order = length_order(tokenizer, texts)  # the batches model_outputs ran, in its order
        again = in_text_order([torch.nn.functional.linear(f, module.weight, module.bias).numpy() for f in feats],
                              order) if feats else None
        self._features = (head, feats, order) if again is not None and np.array_equal(again, self._outputs) else None

    def outputs(self, model, adapters: AdapterSet, task: Task, tokenizer, texts) -> np.ndarray | None:
        import hashlib
        import weakref

        key = (hashlib.sha256("\0".join(texts).encode()).hexdigest(), getattr(tokenizer, "name_or_path", id(tokenizer)),
               task)
        head = self._head(model, adapters) if adapters.extra_tensors else None
        if adapters.extra_tensors and head is None:
            return None
        if self._key is None or self._key[0]() is not model or self._key[1:] != key:
            self._key = (weakref.ref(model), *key)
            self._features = self._outputs = None
            head_name = head or self._head_of(model)
            if head_name is None:
                self._outputs = model_outputs(model, task, tokenizer, texts)
            else:
                self._capture(model, head_name, task, tokenizer, texts)
        if head is None:
            return self._outputs
        if self._features is None or self._features[0] != head:
            return None
        t = {k.rsplit(".", 1)[-1]: v.to(torch.float32) for k, v in adapters.extra_tensors.items()}
        bias = t["bias"] if "bias" in t else dict(model.named_modules())[head].bias
        with torch.no_grad():
            return in_text_order([torch.nn.functional.linear(f, t["weight"], bias).numpy()
                                  for f in self._features[1]], self._features[2])

    def _head_of(self, model) -> str | None:
        """The task head Linear of ``model`` (one module outside the backbone), if there is one."""
        from .merge import is_head_tensor

        heads = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters() if is_head_tensor(model, n)}
        if len(heads) != 1:
            return None
        (head,) = heads
        return head if isinstance(dict(model.named_modules()).get(head), torch.nn.Linear) else None


_BASE_FEATURES = _BaseFeatures()
