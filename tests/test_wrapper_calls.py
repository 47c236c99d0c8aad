"""Inductor's Python wrapper calls our C++ ops through one CPython function each (wrapper_calls.py)."""
import pytest
import torch
from torch._inductor.utils import run_and_get_code
from torch.profiler import ProfilerActivity, profile

from zen_inductor import attention, config, native

from conftest import compile_zen, sqnr
from quantized import HandDequant, K
from test_decode_attention import AttendMasked, _fp32_masked


@pytest.fixture(autouse=True)
def fast_calls_built():
    if native.fast_calls() is None:
        pytest.skip(f"the op library cannot load here: {native.op_library_unavailable()}")


def _decode_linear(**options):
    """A decode step's linear (M = 1: the graph calls our C++ entry): output and wrapper code."""
    torch.manual_seed(0)
    m = HandDequant(64, True, 4).eval()
    x = torch.randn(1, K, dtype=torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad():
        y, (code, *_) = run_and_get_code(compile_zen(m, **options), x)
    return y, code, x.float() @ m.reference_weight().t()


def test_the_wrapper_calls_the_linear_without_torch_ops():
    y, code, ref = _decode_linear()
    assert "zen_fast.linear(" in code and "torch.ops.zen.quant_linear" not in code
    assert sqnr(y, ref) >= 40
    y_op, code_op, _ = _decode_linear(fast_wrapper_calls=False)
    assert "torch.ops.zen.quant_linear.native(" in code_op and "zen_fast" not in code_op
    assert torch.equal(y, y_op)  # one kernel, two ways of calling it


def test_the_direct_calls_still_show_in_the_profiler():
    m = HandDequant(64, True, 4).eval()
    x = torch.randn(1, K, dtype=torch.bfloat16)
    compiled = compile_zen(m)
    with torch.no_grad():
        compiled(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            compiled(x)
    assert [e.count for e in prof.key_averages() if e.key == "zen::quant_linear"] == [1]


def test_decode_attention_is_called_directly():
    if attention.unavailable() is not None:
        pytest.skip(attention.unavailable())
    q = torch.randn(2, 8, 1, 64)
    k, v = torch.randn(2, 2, 64, 64), torch.randn(2, 2, 64, 64)
    mask = torch.zeros(2, 1, 1, 64).masked_fill_(torch.arange(64) >= 40, float("-inf"))
    with torch.no_grad(), config.patch(native_decode_attention=True):
        out, (code, *_) = run_and_get_code(compile_zen(AttendMasked()), q, k, v, mask)
    assert "zen_fast.decode_attention(" in code
    assert sqnr(out, _fp32_masked(q, k, v, mask)) >= 60


def test_bad_arguments_get_a_clear_error():
    """The functions check what the wrapper hands them as the ops' schemas would."""
    fast = native.fast_calls()
    with pytest.raises(RuntimeError, match="linear takes"):
        fast.linear(torch.zeros(1, 4))
    with pytest.raises(TypeError, match="x must be a tensor"):
        fast.linear(1, [], None, "woq_avx2", 4, [4, 32], [4], False, None)
    with pytest.raises(RuntimeError, match="2-D x"):
        fast.linear(torch.zeros(4), [torch.zeros(1)], None, "woq_avx2", 4, [4, 32], [4], False, None)
    with pytest.raises(RuntimeError, match="decode_attention takes"):
        fast.decode_attention(torch.zeros(1, 1, 1, 4))
