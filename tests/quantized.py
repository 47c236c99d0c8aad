"""Quantized test modules and weights shared by the test files (hand-written dequant, GPTQ packing,
torchao configs, random QuantWeights)."""
import re

import torch
import torch.nn.functional as F

from zen_inductor.kernels import LinearSpec, QuantWeight

K, N = 256, 192


def plain_linear(bias=True, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(K, N, bias=bias)).to(dtype).eval()


def reference_output(x, weight, bias):
    y = x.float() @ weight.float().t()
    return y + bias.float() if bias is not None else y


def fp32_weight(weight) -> torch.Tensor:
    """A torchao intx weight dequantized in fp32: its own ``dequantize()`` rounds the weight to the
    scale's dtype (bf16), which puts the reference on eager's side of every comparison."""
    rows, cols = weight.block_size
    def expand(t):
        return t.float().repeat_interleave(rows, 0).repeat_interleave(cols, 1)
    return (weight.qdata.float() - expand(weight.zero_point)) * expand(weight.scale)


def torchao_configs():
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    cases = {}
    for g in (32, 64, 128, 256):
        for mt in (MappingType.SYMMETRIC, MappingType.ASYMMETRIC):
            cases[f"intx_int4_g{g}_{mt.name.lower()}"] = (
                lambda g=g, mt=mt: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(g), mapping_type=mt),
                f"int4_{'sym' if mt == MappingType.SYMMETRIC else 'asym'}_group{g}" if g != K else None,
            )
    cases["intx_int4_per_axis"] = (lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerAxis(0)), "int4_sym_per_channel")
    cases["intx_int8_per_axis"] = (lambda: IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)), "int8_sym_per_channel")
    cases["int8_weight_only"] = (lambda: Int8WeightOnlyConfig(), "int8_sym_per_channel")
    return cases


TORCHAO = torchao_configs()


class HandDequant(torch.nn.Module):
    """How quantized checkpoints run from plain PyTorch: int8 codes, scale, zero point."""

    def __init__(self, group=None, zero_point=True, bits=4, bias=False):
        super().__init__()
        lo, hi = (-8, 8) if bits == 4 else (-128, 128)
        self.group = group or K
        ng = K // self.group
        self.register_buffer("q", torch.randint(lo, hi, (N, K), dtype=torch.int8))
        self.register_buffer("scale", (torch.rand(N, ng, 1) * 0.02 + 0.005).to(torch.bfloat16))
        zp = torch.randint(-2, 3, (N, ng, 1)).to(torch.bfloat16) if zero_point else torch.zeros(N, ng, 1, dtype=torch.bfloat16)
        self.register_buffer("zp", zp)
        self.bias = torch.nn.Parameter(torch.randn(N, dtype=torch.bfloat16)) if bias else None

    def weight(self):
        q = self.q.view(N, K // self.group, self.group)
        return ((q.to(torch.bfloat16) - self.zp) * self.scale).view(N, K)

    def forward(self, x):
        return F.linear(x, self.weight(), self.bias)

    def reference_weight(self):
        q = self.q.view(N, K // self.group, self.group).float()
        return ((q - self.zp.float()) * self.scale.float()).view(N, K)


class GPTQPacked(torch.nn.Module):
    """int4 packed eight per int32 along K (GPTQ / compressed-tensors), unpacked in the graph."""

    def __init__(self, group=64, zero_point=True):
        super().__init__()
        self.group = group
        codes = torch.randint(0, 16, (N, K), dtype=torch.int32)
        packed = torch.zeros(N, K // 8, dtype=torch.int32)
        for i in range(8):
            packed |= codes[:, i::8] << (4 * i)
        self.codes = codes
        self.register_buffer("qweight", packed)
        self.register_buffer("scales", (torch.rand(N, K // group) * 0.02 + 0.005).to(torch.bfloat16))
        zeros = torch.randint(6, 10, (N, K // group)) if zero_point else torch.full((N, K // group), 8)
        self.register_buffer("zeros", zeros.to(torch.int32))
        self.register_buffer("shifts", torch.arange(0, 32, 4, dtype=torch.int32))

    def forward(self, x):
        unpacked = (self.qweight.unsqueeze(-1) >> self.shifts) & 0xF  # [N, K/8, 8]
        q = unpacked.reshape(N, K // self.group, self.group)
        w = (q - self.zeros.unsqueeze(-1)).to(torch.bfloat16) * self.scales.unsqueeze(-1)
        return x @ w.reshape(N, K).t()

    def reference_weight(self):
        q = self.codes.view(N, K // self.group, self.group).float()
        return ((q - self.zeros.float().unsqueeze(-1)) * self.scales.float().unsqueeze(-1)).view(N, K)


def int4_weight(n, k, group, outliers=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, k // group, generator=g) * 0.02 + 0.001
    if outliers:  # a few groups two orders of magnitude louder, as real checkpoints have
        scale.view(-1)[torch.randperm(scale.numel(), generator=g)[: scale.numel() // 50]] *= 100
    offset = torch.randn(n, k // group, generator=g) * 0.01
    return QuantWeight(codes=codes, scale=scale, offset=offset, zero_point=None, group_size=group, bits=4)


def a8w4_spec(w, act_dtype, dynamic=True):
    return LinearSpec(n=w.n, k=w.k, group_size=w.group_size, bits=4, symmetric=w.symmetric,
                      act_dtype=act_dtype, dynamic_activation=dynamic)


def quant_weight(n, k, bits, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    return QuantWeight(codes=torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int8),
                       scale=torch.rand(n, k // group, generator=g) * 0.02 + 0.001,
                       offset=torch.randn(n, k // group, generator=g) * 0.01, zero_point=None, group_size=group, bits=bits)


def quant_linear_calls(graph_text: str, kind: str = "") -> list:
    """The lines of a dumped graph that call zen.quant_linear: its plan (``.default``) or one of our
    C++ entries directly (``.native``, where the rows are fixed); ``kind`` is the fake value's
    start (e.g. ``f32[24, 128]``) to keep only those."""
    pattern = re.escape(kind) + r'[^\n]*= torch\.ops\.zen\.quant_linear\.(default|native)\(' if kind else \
        r"torch\.ops\.zen\.quant_linear\.(default|native)\("
    return [line for line in graph_text.splitlines() if re.search(pattern, line)]


def fuses_swiglu(call: str) -> bool:
    """Whether a zen.quant_linear call line (``quant_linear_calls``) computes the swiglu epilogue."""
    return "epi=swiglu" in call or call.split(";")[0].endswith(", True)")


def every_kernel_packed(spec, weight):
    """(kernel, its packing of ``weight``) for every kernel that may run ``spec``, those a faster
    one prunes too; zentorch's WOQ kernel, which takes integer zero points only (the tuner
    excludes it so), is left out where it refuses the weight."""
    import zen_inductor
    from zen_inductor.kernels import candidates

    with zen_inductor.config.patch(prune_dominated_kernels=False):
        kernels, _ = candidates(spec)
    out = []
    for kernel in kernels:
        try:
            out.append((kernel, kernel.prepack(weight, spec.act_dtype)))
        except ValueError as e:
            assert kernel.name == "zentorch_woq_linear", e
    return out
