"""onnxruntime session options as every loradeploy ONNX session uses them."""

from __future__ import annotations

from pathlib import Path

from ...errors import LoradeployError


def session_options(threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # overridable initializers would each print a warning
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    return so


def inference_session(path: Path, threads: int = 0, provider: str = "CPUExecutionProvider"):
    """An ``InferenceSession`` on ``path`` with loradeploy's session options."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    if provider not in ort.get_available_providers():
        raise LoradeployError(f"execution provider {provider} is not available in this onnxruntime "
                              f"(available: {', '.join(ort.get_available_providers())})")
    return ort.InferenceSession(str(path), session_options(threads), providers=[provider])
