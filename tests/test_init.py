"""Importing loradeploy: PyTorch's OpenMP threads wait passively unless the user said otherwise
(spinning threads on a shared machine made the fp32 reference of an export 4x slower, issue 34)."""

import os
import subprocess
import sys

import pytest

PROBE = "import os, sys, loradeploy; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"


@pytest.mark.parametrize("given, kept", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_openmp_wait_policy_is_set_before_torch_loads(given, kept):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    # libgomp reads the policy once, when torch loads it: the package itself must not import torch
    assert done.stdout.split() == [kept, "False"]
