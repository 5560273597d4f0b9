"""loradeploy.traced_graph: what an adapter feeds to a graph or program with slots as inputs."""

import numpy as np
import pytest

from loradeploy.errors import LoradeployError


def test_adapter_inputs_are_its_factors_and_a_tensor_without_an_input_is_refused_naming_it():
    from loradeploy.adapters import read_adapter
    from loradeploy.base import load_torch_model, resolve_base
    from loradeploy.ir import Task
    from loradeploy.merge import find_module
    from loradeploy.prune import prune
    from loradeploy.traced_graph import adapter_inputs
    from tests.support.paths import EXAMPLE_ADAPTERS

    model = load_torch_model(resolve_base("minilm"), Task.SEQUENCE_CLASSIFICATION, 2)
    pruned, _ = prune(read_adapter(EXAMPLE_ADAPTERS / "sora"))
    qualified = {name: find_module(model, name)[0] for name in pruned.modules}
    tensors = adapter_inputs(pruned, qualified, model)
    assert len(tensors) >= 2 * len(pruned.modules)
    name, m = next(iter(pruned.modules.items()))
    a = tensors[f"{qualified[name]}.lora_A"]
    assert a.dtype == np.float32 and a.shape == tuple(reversed(m.lora_A.shape))
    assert adapter_inputs(pruned, qualified, model, set(tensors), "sora", "program").keys() == tensors.keys()
    missing = sorted(tensors)[0]
    with pytest.raises(LoradeployError, match=rf"^sora: tensor {missing} has no input in the program$"):
        adapter_inputs(pruned, qualified, model, set(tensors) - {missing}, "sora", "program")
