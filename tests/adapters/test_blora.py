import torch

from loradeploy.adapters import read_adapter
from loradeploy.adapters.blora import GATE_ON_THRESHOLD, learned_bits, nested_rank_mask
from loradeploy.ir import Method
from tests.support.synthetic import DEAD_MODULE, make_blora


def test_threshold_value():
    assert abs(GATE_ON_THRESHOLD - (-0.9353)) < 1e-4


def test_nested_mask_closes_everything_after_a_closed_gate():
    mask = nested_rank_mask(torch.tensor([2.0, -2.0, 5.0]))
    assert mask.tolist() == [True, True, False, False]


def test_learned_bits_reads_leading_gates():
    on, off = torch.tensor([1.0]), torch.tensor([-3.0])
    assert learned_bits({4: off, 8: on, 16: on, 32: on}) == 2
    assert learned_bits({4: on, 8: on, 16: off, 32: on}) == 8
    assert learned_bits({4: on, 8: on, 16: on, 32: on}) == 32


def test_blora_delta_and_bits(tmp_path):
    syn = make_blora(tmp_path / "b")
    adapters = read_adapter(syn.path)
    assert adapters.method is Method.BLORA
    for name, expected in syn.delta.items():
        m = adapters.modules[name]
        torch.testing.assert_close(m.delta_weight(), expected, rtol=1e-12, atol=1e-12)
        assert int(m.live_ranks().sum()) == syn.live_ranks[name]
        assert m.bits == {"lora_A": 8, "lora_B": 4, "gate": 32}
    assert adapters.modules[DEAD_MODULE].live_ranks().sum() == 0
    assert set(adapters.extra_tensors) == {"classifier.weight", "classifier.bias"}
