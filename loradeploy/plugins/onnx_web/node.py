"""Node and the repository's ``web/`` npm package: where they are, and one persistent Node
process (``web/bin/session-worker.mjs``) that runs a bundle's own ``loradeploy.mjs`` and answers
one JSON line per request line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from ...errors import LoradeployError

#: the npm package holding onnxruntime-web, the tokenizer library, loradeploy.mjs and the runners
WEB_DIR = Path(__file__).resolve().parents[3] / "web"
ORT_DIST = WEB_DIR / "node_modules" / "onnxruntime-web" / "dist"
TOKENIZERS_DIST = WEB_DIR / "node_modules" / "@huggingface" / "tokenizers" / "dist"


def node_binary() -> str:
    found = shutil.which("node")
    if not found:
        raise LoradeployError("node not found: the onnx-web target needs Node >= 20 on the PATH")
    return found


def require_packages() -> None:
    """One line naming the fix when ``web/node_modules`` has not been installed."""
    for path in (ORT_DIST / "ort.wasm.min.mjs", TOKENIZERS_DIST / "tokenizers.min.mjs"):
        if not path.is_file():
            raise LoradeployError(f"{path}: missing; the onnx-web target needs the web/ npm packages: "
                                  f"run `npm ci --prefix {WEB_DIR}`")


def package_version(name: str) -> str | None:
    try:
        return json.loads((WEB_DIR / "node_modules" / name / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


class NodeWorker:
    """``node web/bin/session-worker.mjs``: requests and replies as JSON lines, one at a time."""

    def __init__(self):
        require_packages()
        self._lock = threading.Lock()
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen([node_binary(), str(WEB_DIR / "bin" / "session-worker.mjs")],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                      text=True, env={**os.environ, "NODE_NO_WARNINGS": "1"})

    def call(self, op: str, **args):
        """The reply's result; a reply with an error raises it as a :class:`LoradeployError`."""
        with self._lock:
            if self._proc is None:
                raise LoradeployError("the Node worker of this session is closed")
            try:
                self._proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
                self._proc.stdin.flush()
                line = self._proc.stdout.readline()
            except (BrokenPipeError, OSError):
                line = ""
            if not line:
                raise LoradeployError(f"the Node worker exited ({self._last_stderr()})")
        reply = json.loads(line)
        if "error" in reply:
            raise LoradeployError(reply["error"])
        return reply["ok"]

    def _last_stderr(self) -> str:
        self._stderr.seek(0)
        lines = self._stderr.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no output"

    def close(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            self._stderr.close()
