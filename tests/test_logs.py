"""loradeploy.logs: the rule (own records from WARNING, every other library's from ERROR,
library warnings dropped; everything from WARNING with verbose), checked on loggers named
like no library today, in a fresh process each (logging's state is process-wide)."""

import subprocess
import sys

import pytest

SCRIPT = r"""
import logging, sys, warnings
# a library imported before the call, logging through a handler of its own (as transformers does)
lib = logging.getLogger("somelib")
lib.propagate = False
own_handler = logging.StreamHandler(sys.stderr)
own_handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
lib.addHandler(own_handler)

from loradeploy import quiet_third_party_logs
quiet_third_party_logs(**VERBOSE)

for name in ("kernels._internals.hf_hub", "a_library_from_next_year.sub", "somelib"):
    logging.getLogger(name).warning("third-party warning from %s", name)
    logging.getLogger(name).error("third-party error from %s", name)
logging.getLogger("loradeploy.base").warning("own warning")
logging.getLogger("loradeploy.base").info("own info")
exec(compile('import warnings; warnings.warn("a library UserWarning")', "thirdparty.py", "exec"),
     {"__name__": "thirdparty"})
"""


def run(verbose: bool | None, env: dict | None = None) -> list[str]:
    kwargs = {} if verbose is None else {"verbose": verbose}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.replace("**VERBOSE", f"**{kwargs!r}")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.splitlines()


def _env(**extra):
    import os

    env = {k: v for k, v in os.environ.items() if k != "LORADEPLOY_DEBUG"}
    return {**env, **extra}


def test_third_party_warnings_are_dropped_errors_and_own_warnings_pass():
    lines = run(verbose=None, env=_env())
    text = "\n".join(lines)
    assert "third-party warning" not in text and "UserWarning" not in text
    for name in ("kernels._internals.hf_hub", "a_library_from_next_year.sub", "somelib"):
        assert f"third-party error from {name}" in text
    assert "own warning" in text and "own info" not in text


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_verbose_lets_library_warnings_through(how):
    lines = run(True, _env()) if how == "argument" else run(None, _env(LORADEPLOY_DEBUG="1"))
    text = "\n".join(lines)
    for name in ("kernels._internals.hf_hub", "a_library_from_next_year.sub", "somelib"):
        assert f"third-party warning from {name}" in text
    assert "a library UserWarning" in text and "own warning" in text


def test_the_cli_applies_the_rule_and_verbose_lifts_it():
    """`loradeploy --verbose` reaches the same switch (the group option)."""
    code = ("import logging, sys\n"
            "from loradeploy.cli import main\n"
            "main(sys.argv[1:])\n"
            "logging.getLogger('a_library_from_next_year').warning('late library warning')\n")
    quiet = subprocess.run([sys.executable, "-c", code, "targets"], capture_output=True, text=True,
                           timeout=120, env=_env())
    loud = subprocess.run([sys.executable, "-c", code, "--verbose", "targets"], capture_output=True,
                          text=True, timeout=120, env=_env())
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    assert "late library warning" not in quiet.stderr
    assert "late library warning" in loud.stderr


def test_torch_imported_after_the_rule_is_held_to_it():
    """torch sets up its own handler at import, after the CLI applied the rule: its warnings
    (torchao, imported by transformers' quantizers, makes it warn at import) stay out, its errors
    pass, and verbose lets its warnings through."""
    code = ("import logging\n"
            "from loradeploy import quiet_third_party_logs\n"
            "quiet_third_party_logs(VERBOSE)\n"
            "import torch\n"
            "logging.getLogger('torch.utils._pytree').warning('torch warning at import')\n"
            "logging.getLogger('torch.utils._pytree').error('torch error')\n")
    env = {k: v for k, v in _env().items() if k != "TORCH_LOGS"}
    quiet, verbose = (subprocess.run([sys.executable, "-c", code.replace("VERBOSE", str(v))], capture_output=True,
                                     text=True, timeout=120, env=env).stderr for v in (False, True))
    assert "torch warning at import" not in quiet and "torch error" in quiet, quiet
    assert "torch warning at import" in verbose, verbose
