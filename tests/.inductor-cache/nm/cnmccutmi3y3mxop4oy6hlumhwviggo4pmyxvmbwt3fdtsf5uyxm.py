# AOT ID: ['10_inference']
from ctypes import c_void_p, c_long, c_int
import torch
import math
import random
import os
import tempfile
from math import inf, nan
from cmath import nanj
from torch._inductor.hooks import run_intermediate_hooks
from torch._inductor.utils import maybe_profile
from torch._inductor.codegen.memory_planning import _align as align
from torch import device, empty_strided
from torch._inductor.async_compile import AsyncCompile
from torch._inductor.select_algorithm import extern_kernels

aten = torch.ops.aten
inductor_ops = torch.ops.inductor
_quantized = torch.ops._quantized
assert_size_stride = torch._C._dynamo.guards.assert_size_stride
assert_alignment = torch._C._dynamo.guards.assert_alignment
empty_strided_cpu = torch._C._dynamo.guards._empty_strided_cpu
empty_strided_cpu_pinned = torch._C._dynamo.guards._empty_strided_cpu_pinned
empty_strided_cuda = torch._C._dynamo.guards._empty_strided_cuda
empty_strided_xpu = torch._C._dynamo.guards._empty_strided_xpu
empty_strided_mtia = torch._C._dynamo.guards._empty_strided_mtia
reinterpret_tensor = torch._C._dynamo.guards._reinterpret_tensor
alloc_from_pool = torch.ops.inductor._alloc_from_pool
async_compile = AsyncCompile()
empty_strided_p2p = torch._C._distributed_c10d._SymmetricMemory.empty_strided_p2p
_frozen_param3 = None  # device(type='cpu') torch.bfloat16 (192,) (1,) 7f1646d3e4e0
_zen_dequant_matmul_0 = None  # device(type='cpu') torch.int8 (192, 256) (256, 1) 7f1646de3160
_zen_dequant_matmul_1 = None  # device(type='cpu') torch.bfloat16 (192,) (1,) 7f1646da4370


async_compile.wait(globals())
del async_compile

class Runner:
    def __init__(self, partitions):
        self.partitions = partitions

    def recursively_apply_fns(self, fns):
        new_callables = []
        for fn, c in zip(fns, self.partitions):
            new_callables.append(fn(c))
        self.partitions = new_callables

    def call(self, args):
        arg4_1, = args
        args.clear()
        assert_size_stride(arg4_1, (2, 7, 256), (1792, 256, 1), 'input')
        # Topologically Sorted Source Nodes: [input_1], Original ATen: [aten.view]
        buf0 = torch.ops.zen.quant_linear.default(reinterpret_tensor(arg4_1, (14, 256), (256, 1), 0), [_zen_dequant_matmul_0, _zen_dequant_matmul_1], [2], _frozen_param3, 'n=192;k=256;g=256;bits=8;sym=1;act=bfloat16;da8=0;edges=1,4,16,64,256,1024;bins=aten_int8pack_mm,aten_int8pack_mm,aten_int8pack_mm,aten_int8pack_mm,aten_int8pack_mm,aten_int8pack_mm,aten_int8pack_mm')
        del arg4_1
        buf1 = buf0
        assert_size_stride(buf1, (14, 192), (192, 1), 'torch.ops.zen.quant_linear.default')
        # buffer buf1 (op: torch.ops.zen.quant_linear.default) is assumed to be not aligned
        return (reinterpret_tensor(buf1, (2, 7, 192), (1344, 192, 1), 0), )

runner = Runner(partitions=[])
call = runner.call
recursively_apply_fns = runner.recursively_apply_fns


def get_args():
    from torch._dynamo.testing import rand_strided
    global _frozen_param3
    _frozen_param3 = rand_strided((192, ), (1, ), device='cpu', dtype=torch.bfloat16)
    global _zen_dequant_matmul_0
    _zen_dequant_matmul_0 = rand_strided((192, 256), (256, 1), device='cpu', dtype=torch.int8)
    global _zen_dequant_matmul_1
    _zen_dequant_matmul_1 = rand_strided((192, ), (1, ), device='cpu', dtype=torch.bfloat16)
    arg4_1 = rand_strided((2, 7, 256), (1792, 256, 1), device='cpu', dtype=torch.bfloat16)
    return [arg4_1]


def benchmark_compiled_module(args, times=10, repeat=10):
    from torch._inductor.utils import print_performance
    fn = lambda: call(list(args))
    return print_performance(fn, times=times, repeat=repeat, device='cpu')


if __name__ == "__main__":
    from torch._inductor.wrapper_benchmark import compiled_module_main
    args = get_args()
    compiled_module_main('None', lambda times, repeat: benchmark_compiled_module(args, times=times, repeat=repeat))
