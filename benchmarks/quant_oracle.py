"""Where the plan search's plan family ends: the search fitted on the eval texts themselves.

For a MiniLM example adapter on ONNX Runtime storage, at a byte limit (default: the bytes of
uniform int8), the plan search runs with the eval set as its calibration texts — sensitivities,
output-aware codes and truncations, the end-to-end checks and the whole-plan candidates all see
the texts it is then judged on — and the error of the plan it keeps (mean |Δlogit| in PyTorch
against the fp32 adapter, on the same texts) is set against uniform int8 with nearest rounding.
With nearest codes, every choice is then made in-sample. It is not a bound: output-aware codes
minimise each module's squared output error, not |Δlogit|, and fitted on the eval texts they can
do worse there than fitted on others (sora: 0.68× this way, 0.59× from its 64 training texts).
It shows where the search's plan family (formats per tensor × SVD ranks × rounding) ends: when
even fitted on the eval texts it keeps uniform int8 (ratio 1.00), no mix it can build beats it.

    python benchmarks/quant_oracle.py [--adapter blora] [--max-bytes N] [--texts N]
                                      [--rounding output-aware,nearest] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def oracle(adapter: str, max_bytes: int | None = None, texts: int | None = None,
           roundings: tuple[bool, ...] = (True, False)) -> list[dict]:
    from loradeploy.base import load_tokenizer
    from loradeploy.evaldata import load_eval
    from loradeploy.job import AdapterInputs, load_base_for, load_entries
    from loradeploy.quant.plan import hinted_formats, quantize_adapter, uniform_formats
    from loradeploy.quant.evaluator import Evaluator, calibration_batches
    from loradeploy.quant.search import search

    (entry,) = load_entries(AdapterInputs.of({adapter: REPO / "examples" / "adapters" / adapter}))
    base_dir, task, _labels, model = load_base_for("minilm", (entry,))
    batches = calibration_batches(load_tokenizer(base_dir), load_eval(limit=texts).texts, task, 128)
    uniform8 = uniform_formats(entry.pruned, "onnxruntime", "int8")
    cap = max_bytes or quantize_adapter(entry.pruned, "onnxruntime", uniform8).nbytes
    rows = []
    for rounding in roundings:
        t = time.perf_counter()
        ev = Evaluator(model, entry.pruned, "onnxruntime", task, batches, rounding=rounding)
        baseline = ev.error(uniform8, rounding=False)["mean_abs_logit"]
        result = search(ev, max_bytes=cap, ranks=True, start=hinted_formats(entry.pruned, "onnxruntime", entry.original))
        got = result.measured["mean_abs_logit"]
        rows.append({"adapter": adapter, "rounding": "output-aware" if rounding else "nearest", "max_bytes": cap,
                     "texts": sum(len(b["input_ids"]) for b in batches), "kept": result.chosen_from,
                     "bytes": result.nbytes, "mean_abs_logit": got, "uniform_int8_nearest": baseline,
                     "ratio": got / baseline if baseline else None,
                     "search_path_at_cap": {"bytes": result.curve[0]["bytes"],
                                            "mean_abs_logit": result.curve[0]["mean_abs_logit"]},
                     "seconds": time.perf_counter() - t})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", default="blora")
    ap.add_argument("--max-bytes", type=int, default=None, help="default: the bytes of uniform int8")
    ap.add_argument("--texts", type=int, default=None, help="the first N eval texts (default: all 500)")
    ap.add_argument("--rounding", default="output-aware,nearest")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    roundings = tuple({"output-aware": True, "nearest": False}[r] for r in args.rounding.split(","))
    rows = oracle(args.adapter, args.max_bytes, args.texts, roundings)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    for r in rows:
        print(f"{r['adapter']} ({r['rounding']} codes), fitted on the {r['texts']} eval texts, ≤ {r['max_bytes']:,} B: "
              f"kept {r['kept']} ({r['bytes']:,} B) {r['mean_abs_logit']:.3g} vs uniform int8 nearest "
              f"{r['uniform_int8_nearest']:.3g}: {r['ratio']:.2f}×; the search's path at the cap "
              f"{r['search_path_at_cap']['bytes']:,} B {r['search_path_at_cap']['mean_abs_logit']:.3g} "
              f"[{r['seconds']:.0f} s]")


if __name__ == "__main__":
    main()
