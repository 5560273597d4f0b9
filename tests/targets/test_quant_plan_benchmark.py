"""benchmarks/quant_plan.py, scaled down: its LM measure (a plan's artifact against the fp16-adapter
artifact, both in llama.cpp) is zero for the same adapter and grows as the adapter is stored in
fewer bits."""

import pytest

from benchmarks import quant_plan as bench
from loradeploy.job import AdapterSpec
from tests.exports import export_adapters as export
from tests.targets.test_gguf import TEXTS, fast_profile, gemma, tiny  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


def test_lm_plan_error_is_measured_against_the_fp16_adapter_in_llama_cpp(tmp_path, tiny):  # noqa: F811
    _, path, adapter = tiny
    profile = fast_profile(tmp_path, "gguf-cpu")
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("\n".join(TEXTS) + "\n")
    rows = []
    for plan in ("uniform:16", "uniform:4"):
        record = export(str(path), [AdapterSpec("qk", adapter)], profile, tmp_path / plan.replace(":", ""),
                        eval_path=eval_file, plan=plan)
        rows.append({"artifact": str(tmp_path / plan.replace(":", "")), "bytes": record["adapters"][0]["plan"]["bytes"]})
    assert rows[1]["bytes"] < rows[0]["bytes"]
    rows.insert(1, dict(rows[0]))
    bench.lm_errors_vs_fp16(rows, "qk", rows[0]["artifact"], TEXTS)
    assert rows[0]["kl_vs_fp16_adapter"] == rows[1]["kl_vs_fp16_adapter"] == 0.0  # the same file, the same logits
    assert rows[2]["kl_vs_fp16_adapter"] > 1e-7  # 4-bit lora_a moves them
