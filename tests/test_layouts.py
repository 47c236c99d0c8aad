"""Whatever the layout of the activations that reach a linear, every kernel gives the answer it
gives on the same values packed in rows (a view with rows apart, a transposed view)."""
import pytest
import torch

import zen_inductor
from zen_inductor.kernels import LinearSpec, run_kernel

from conftest import compile_zen, quantize, sqnr
from quantized import K, N, every_kernel_packed, fp32_weight, quant_weight


def _views(m):
    wide = torch.randn(m, 2 * K).to(torch.bfloat16)
    return {
        "rows apart (a slice of a wider tensor)": wide[:, K // 2: K // 2 + K],
        "transposed": torch.randn(K, m).to(torch.bfloat16).t(),
        "every other row": torch.randn(2 * m, K).to(torch.bfloat16)[::2],
    }


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 32)])
def test_every_kernel_reads_views_as_their_values(bits, group):
    w = quant_weight(N, K, bits, group)
    spec = LinearSpec(n=N, k=K, group_size=group, bits=bits, symmetric=False, act_dtype=torch.bfloat16)
    packed_kernels = every_kernel_packed(spec, w)
    assert packed_kernels
    bias = torch.randn(N).to(torch.bfloat16)
    for kernel, packed in packed_kernels:
        for m in (2, 5):  # one row is contiguous however it was cut
            for how, x in _views(m).items():
                assert not x.is_contiguous()
                y = run_kernel(kernel, x, packed, bias, spec)
                assert torch.equal(y, run_kernel(kernel, x.contiguous(), packed, bias, spec)), (kernel.name, how, m)


class SlicedInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(K, N, bias=False)

    def forward(self, x):  # the linear sees a view whose rows are 2K apart
        return self.linear(x[:, K:])


def test_a_compiled_linear_on_a_sliced_input_is_right():
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    torch.manual_seed(0)
    m = quantize(SlicedInput().to(torch.bfloat16).eval(), IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    ref_w = fp32_weight(m.linear.weight)
    fast = compile_zen(m)
    with torch.no_grad():
        for rows in (1, 7):
            x = torch.randn(rows, 2 * K).to(torch.bfloat16)
            y = fast(x)
            assert sqnr(y, x[:, K:].float() @ ref_w.t()) >= 40, rows
    assert zen_inductor.counters["dequant_matmul"] >= 1
