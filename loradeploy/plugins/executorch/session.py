"""ExecuTorch plugin, runtime side: the one loader of ExecuTorch artifacts, through executorch's
Python runtime (``executorch.runtime.Runtime``; XNNPACK registered). The program is loaded once
and its ``forward`` method once; an adapter is its tensors read from its ``.ptd``, held at their
own rank (each slot's rank axis is dynamic up to its module's bound) as the method's inputs:
swapping adapters is feeding other tensors, never reloading the program. A method keeps its
inputs and planned memory between calls, so calls are serialized. The writer is
``loradeploy.plugins.executorch.exporter``."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ...errors import BaseModelError, LoradeployError
from ...runtime.session import HfTokenizer, Session, refuse
from . import PROGRAM_CONFIG, PROGRAM_FILE, SPEC
from .tensor_data import check_tensor_data, read_tensor_data


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def header_problem(path: Path) -> str | None:
    """What is wrong with the ``.pte``'s headers (its flatbuffer identifier ``ET..`` and the
    extended header's magic and sizes), read in Python: the runtime, given a bad identifier, logs
    its bytes and the Python binding aborts the whole process decoding them (measured with 1.5.1)."""
    import re

    from executorch.exir._serialize._program import _ExtendedHeader

    with open(path, "rb") as f:
        head = f.read(64)
    size = Path(path).stat().st_size
    if len(head) < 8 + _ExtendedHeader.EXPECTED_LENGTH or not re.fullmatch(rb"ET[0-9A-Za-z]{2}", head[4:8]):
        return "not an ExecuTorch program (no ET.. identifier at byte 4)"
    eh = _ExtendedHeader.from_bytes(head[8:])
    if not eh.is_valid():
        return "its extended header is invalid (no eh00 magic)"
    if eh.program_size > size:
        return f"its header records a {eh.program_size}-byte program, the file has {size} bytes"
    if eh.segment_base_offset + eh.segment_data_size > size:
        return (f"its header records segments up to byte {eh.segment_base_offset + eh.segment_data_size}, the file "
                f"has {size} (truncated)")
    return None


def load_method(path: Path):
    """The ``forward`` method of the program at ``path`` (a :class:`BaseModelError` naming the file
    when its headers are bad or the runtime refuses it)."""
    from executorch.runtime import Runtime, Verification

    problem = header_problem(path)
    if problem:
        raise BaseModelError(f"{path}: {problem}")
    try:
        program = Runtime.get().load_program(Path(path), verification=Verification.InternalConsistency)
        method = program.load_method("forward")
    except Exception as e:  # noqa: BLE001  the runtime's complaint is the file's problem
        raise BaseModelError(f"{path}: ExecuTorch cannot load it ({_first_line(e)})") from e
    if method is None:
        raise BaseModelError(f"{path}: the program has no forward method")
    return program, method


def _check_program(path: Path) -> str | None:
    """``verify``'s check of a ``.pte``: the runtime loads the program and its method."""
    load_method(path)
    return None


def set_threads(threads: int) -> None:
    """The XNNPACK thread pool's size (process-wide in executorch's Python runtime); 0: leave it."""
    if threads:
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(int(threads))


def adapter_problems(tensors: dict[str, np.ndarray], meta: dict, config: dict) -> list[str]:
    """What in an adapter's tensors does not fit the program's method inputs: a LoRA factor's rank
    above its module's bound (the input's shape), a module with one factor or factors of two ranks."""
    if meta.get("base_fingerprint") != config["base_fingerprint"]:
        return [f"it names base {meta.get('base_fingerprint')}, the program's is {config['base_fingerprint']}"]
    specs = {i["name"]: i for i in config["inputs"]}
    problems, ranks = [], {}
    for name, arr in sorted(tensors.items()):
        spec = specs.get(name)
        if spec is None:
            problems.append(f"{name} is not an input of this program")
        elif spec["role"] == "travelling":
            if list(arr.shape) != spec["shape"]:
                problems.append(f"{name} is {list(arr.shape)}, the program takes {spec['shape']}")
        else:
            rank_axis, fixed_axis = (1, 0) if spec["role"] == "lora_A" else (0, 1)
            module, bound = name.rsplit(".", 1)[0], spec["shape"][rank_axis]
            if arr.ndim != 2 or arr.shape[fixed_axis] != spec["shape"][fixed_axis] or arr.shape[rank_axis] < 1:
                problems.append(f"{name} is {list(arr.shape)}, the program takes {spec['shape']}")
                continue
            ranks.setdefault(module, {})[spec["role"]] = arr.shape[rank_axis]
            if arr.shape[rank_axis] > bound:
                problems.append(f"module {module} has rank {arr.shape[rank_axis]}, above the program's rank bound "
                                f"{bound} for it")
    for module, r in ranks.items():
        if len(r) == 1:
            problems.append(f"module {module} has {next(iter(r))} but not {({'lora_A', 'lora_B'} - set(r)).pop()}")
        elif r["lora_A"] != r["lora_B"]:
            problems.append(f"module {module}: its lora_A has rank {r['lora_A']}, its lora_B rank {r['lora_B']}")
    return problems


class ExecuTorchSession(HfTokenizer, Session):
    runtime = SPEC.name
    FILE_CHECKS = {".pte": _check_program, ".ptd": check_tensor_data}

    def __init__(self, artifact: Path, manifest, threads: int = 0, workers: int = 0):
        super().__init__(artifact, manifest)
        self.config = json.loads((self.artifact / PROGRAM_CONFIG).read_text())
        set_threads(threads)
        self.program, self.method = load_method(self.artifact / PROGRAM_FILE)
        self._call_lock = threading.Lock()
        self._checked = threading.local()  # the tensors _check_tensors read, per loading thread
        self._base_inputs: list = []
        if self.config["inputs"]:
            defaults, meta = read_tensor_data(self.artifact / self.config["base_tensors"])
            refuse(self.artifact / self.config["base_tensors"], "method inputs", adapter_problems(defaults, meta, self.config))
            self._base_inputs = self._base_tensors(defaults)

    def _base_tensors(self, defaults: dict[str, np.ndarray]) -> list:
        """The method's tensor inputs with no adapter: one shared zero tensor per slot shape (at
        rank 1 where the rank axis is dynamic), the travelling tensors' defaults."""
        import torch

        zeros: dict[tuple, object] = {}
        out = []
        for spec in self.config["inputs"]:
            if spec["role"] == "travelling":
                out.append(torch.from_numpy(np.ascontiguousarray(defaults[spec["name"]], dtype=np.float32)))
            else:
                shape = list(spec["shape"])
                if spec.get("rank_axis") == "dynamic":
                    shape[1 if spec["role"] == "lora_A" else 0] = 1
                out.append(zeros.setdefault(tuple(shape), torch.zeros(shape, dtype=torch.float32)))
        return out

    def _inputs_for(self, tensors: dict[str, np.ndarray]) -> list:
        """The method's tensor inputs after the token ids: ``tensors`` as they are (a factor at its
        own rank; padded with zeros only where the rank axis is fixed); where they have nothing,
        the base's (shared, never written: the method copies its inputs into its planned memory)."""
        import torch

        out = list(self._base_inputs)
        for i, spec in enumerate(self.config["inputs"]):
            arr = tensors.get(spec["name"])
            if arr is None:
                continue
            value = np.ascontiguousarray(arr, dtype=np.float32)
            fixed_rank = spec["role"] != "travelling" and spec.get("rank_axis") != "dynamic"
            if fixed_rank and list(value.shape) != spec["shape"]:  # programs exported before per-module bounds
                value = np.zeros(spec["shape"], np.float32)
                value[:arr.shape[0], :arr.shape[1]] = arr
            out[i] = torch.from_numpy(value)
        return out

    def _check_tensors(self, path):
        """Read and check the adapter's ``.ptd``; its tensors are kept for :meth:`_load`, which
        follows (reading the file is most of a load: read it once)."""
        tensors, meta = read_tensor_data(path)
        refuse(path, "method inputs", adapter_problems(tensors, meta, self.config))
        self._checked.tensors = (Path(path), tensors)

    def _load(self, name, path):
        kept = getattr(self._checked, "tensors", None)
        self._checked.tensors = None
        tensors = kept[1] if kept is not None and kept[0] == Path(path) else read_tensor_data(path)[0]
        return self._inputs_for(tensors)

    def _free(self, rec):
        rec.handle = None

    def _run(self, inputs, rec):
        import torch

        ids = torch.from_numpy(np.ascontiguousarray(inputs["input_ids"], dtype=np.int64))
        mask = torch.from_numpy(np.ascontiguousarray(inputs["attention_mask"], dtype=np.int64))
        problem = self._shape_problem(tuple(ids.shape))
        if problem:
            raise LoradeployError(f"{self.artifact / PROGRAM_FILE}: {problem}")
        tensors = rec.handle if rec is not None else self._base_inputs
        with self._call_lock:
            out = self.method.execute([ids, mask, *tensors])[0]
        return out.detach().numpy().copy()

    def _shape_problem(self, shape: tuple[int, ...]) -> str | None:
        batch, seq = shape
        if not 1 <= batch <= self.config["max_batch"]:
            return f"batch {batch} is outside the program's batch axis [1, {self.config['max_batch']}]"
        if not 2 <= seq <= self.config["max_seq"]:
            return f"sequence length {seq} is outside the program's sequence axis [2, {self.config['max_seq']}]"
        return None

    def close(self):
        super().close()
        self.method = self.program = None

    @staticmethod
    def reference_unit(threads: int = 0):
        """A fixed MLP block (384 → 1536 → 384 on 128 positions, seeded weights) lowered to
        XNNPACK and run by the same runtime: the kernels the artifact runs, so a ratio to it
        carries over between runs of one CPU kind and thread count."""
        import torch
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        gen = torch.Generator().manual_seed(0)
        hidden, ffn, seq = 384, 1536, 128
        mlp = torch.nn.Sequential(torch.nn.Linear(hidden, ffn, bias=False), torch.nn.ReLU(),
                                  torch.nn.Linear(ffn, hidden, bias=False)).eval()
        with torch.no_grad():
            for layer in (mlp[0], mlp[2]):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.05)
        x = torch.randn(1, seq, hidden, generator=gen)
        program = to_edge_transform_and_lower(torch.export.export(mlp, (x,)),
                                              partitioner=[XnnpackPartitioner()]).to_executorch()
        set_threads(threads)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "reference_unit.pte"
            path.write_bytes(program.buffer)
            unit_program, method = load_method(path)

        def unit() -> float:
            t0 = time.perf_counter()
            method.execute([x])
            return (time.perf_counter() - t0) * 1e3
        unit.program = unit_program  # kept alive as long as the unit
        return unit
