"""llama.cpp target, ratios measured side by side in one run (Gemma 3 270M Q4_K_M + the shipped
SoRA Gemma adapter as an F16 adapter GGUF):

    python benchmarks/gguf_cpu.py [--runs 10] [--adapter examples/adapters/sora-gemma]

Prompt processing (128 tokens) and generation tokens/s with the adapter and with the base alone,
interleaved round by round in one process; adapter load and switch time vs reloading the model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--adapter", default=str(REPO / "examples" / "adapters" / "sora-gemma"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    art = work / "art"
    subprocess.run([sys.executable, "-m", "loradeploy.cli", "export", "--base", "gemma3-270m", "--adapter",
                    f"a={args.adapter}", "--target", "gguf-cpu", "-o", str(art)], check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-m", "loradeploy.runtime.latency_worker", str(art),
                          "--adapter", "a", "--shape", "1x128", "--warmup", "1", "--runs", str(args.runs)],
                         check=True, capture_output=True, text=True).stdout
    r = json.loads(out)["generation"]
    print(f"Gemma 3 270M Q4_K_M, F16 adapter GGUF ({Path(args.adapter).name}), {args.runs} interleaved rounds")
    print(f"  prompt 128 tok/s: adapter {r['pp128_tokens_per_s']:.0f}, base {r['pp128_tokens_per_s_base']:.0f}, "
          f"ratio {r['pp128_tokens_per_s'] / r['pp128_tokens_per_s_base']:.3f} (goal >= 0.9)")
    print(f"  generation tok/s: adapter {r['tg_tokens_per_s']:.1f}, base {r['tg_tokens_per_s_base']:.1f}, "
          f"ratio {r['tg_tokens_per_s'] / r['tg_tokens_per_s_base']:.3f} (goal >= 0.9)")
    print(f"  adapter load {r['adapter_load_ms']:.2f} ms, switch {r['adapter_switch_ms'] * 1e3:.1f} us, "
          f"model reload {r['model_reload_ms']:.0f} ms: reload / switch = {r['reload_over_switch']:,.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
