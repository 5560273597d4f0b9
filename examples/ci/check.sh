#!/usr/bin/env bash
# Export the example SoRA adapter for onnx-cpu and gate it against the committed baseline:
# verify the artifact, then `check` it (exit 1 on a fidelity, size or latency regression).
# JUnit XML and a Markdown table land in $REPORTS (default: ci-reports/).
#
#   bash examples/ci/check.sh            # from the repository root, after `make setup`
#
# Refresh the baseline after an intended change:
#   loradeploy export ... -o OUT && cp OUT/manifest.json examples/ci/baseline/manifest.json
# Latency is compared only on a machine with the baseline's fingerprint (CPU, ISA level,
# runtime version, threads); elsewhere it is reported as INFO. Fidelity holds on any machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
LORADEPLOY=${LORADEPLOY:-.venv/bin/loradeploy}
OUT=${OUT:-ci-artifacts/sora-onnx-cpu}
REPORTS=${REPORTS:-ci-reports}
mkdir -p "$REPORTS" "$(dirname "$OUT")"

"$LORADEPLOY" export --base minilm --adapter sora=examples/adapters/sora --target onnx-cpu \
    -o "$OUT" --overwrite
"$LORADEPLOY" verify "$OUT"
"$LORADEPLOY" check "$OUT" --baseline examples/ci/baseline/manifest.json \
    --tolerance fidelity=0.01,latency=1.0,size=0.01 \
    --junit "$REPORTS/loradeploy-check.xml" --markdown "$REPORTS/loradeploy-check.md"
