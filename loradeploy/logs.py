"""What a loradeploy process lets through to stderr.

One rule, whatever today's library versions print: records of loradeploy's own loggers pass
from WARNING, every other library's (transformers, huggingface_hub, kernels, bitsandbytes,
onnxruntime, ray, …) only from ERROR, and library warnings (``warnings.warn``) are dropped.
``verbose`` (the CLI's ``--verbose``, or ``LORADEPLOY_DEBUG`` set) lets everything from
WARNING through. The rule is a filter on the handlers, not a list of logger names, so a
logger that appears in a new release is held to it too.

A leaf module: imports nothing of loradeploy's.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

__all__ = ["DEBUG_ENV", "OWN_LOGGER", "quiet_third_party_logs"]

DEBUG_ENV = "LORADEPLOY_DEBUG"
OWN_LOGGER = "loradeploy"
_FORMAT = "%(levelname)s %(name)s: %(message)s"
# libraries that log through handlers of their own (not the root's) read these at import; torch's
# handler (set up at ``import torch``, after this runs) is held at ERROR by TORCH_LOGS' "-torch"
# (seen: torchao, imported by transformers' quantizers when installed, makes torch warn at import)
_LIBRARY_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_VERBOSITY": "error", "TF_CPP_MIN_LOG_LEVEL": "3",
                "TORCH_LOGS": "-torch"}


def _is_own(name: str) -> bool:
    return name == OWN_LOGGER or name.startswith(OWN_LOGGER + ".") or name == "__main__"


class ThirdPartyAtError(logging.Filter):
    """Passes loradeploy's records and other libraries' records from ``ERROR`` up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or _is_own(record.name)


_FILTER = ThirdPartyAtError()
_HANDLER_MARK = "_loradeploy_handler"


def _own_handler() -> logging.Handler:
    root = logging.getLogger()
    for handler in root.handlers:
        if getattr(handler, _HANDLER_MARK, False):
            return handler
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    return handler


def quiet_third_party_logs(verbose: bool | None = None) -> None:
    """Apply the rule above to this process (idempotent; call again to change ``verbose``).

    Also keeps Hugging Face libraries offline (``HF_HUB_OFFLINE=1`` unless set): loradeploy
    loads bases from local files only, and a library's attempt to reach the hub would only
    print a warning. ``verbose=None`` reads ``LORADEPLOY_DEBUG`` from the environment."""
    if verbose is None:
        verbose = bool(os.environ.get(DEBUG_ENV))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    handler = _own_handler()
    loggers = [root] + [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    handlers = {h for lg in loggers for h in lg.handlers} | {handler}
    for h in handlers:
        (h.removeFilter if verbose else h.addFilter)(_FILTER)
    if verbose:
        warnings.resetwarnings()
        return
    for key, value in _LIBRARY_ENV.items():
        os.environ.setdefault(key, value)
    for name, lg in list(logging.Logger.manager.loggerDict.items()):
        # a library already imported with a handler of its own (transformers) has read its env
        if isinstance(lg, logging.Logger) and lg.handlers and not _is_own(name):
            lg.setLevel(max(lg.level, logging.ERROR))
    # library warnings are theirs to act on; loradeploy's own still show
    warnings.filterwarnings("ignore", module=rf"(?!{OWN_LOGGER}\b)")
