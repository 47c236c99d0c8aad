# AOT ID: ['23_inference']
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


cpp_fused__to_copy_mul_sub_view_0 = async_compile.cpp_pybinding(['const int8_t*', 'const at::BFloat16*', 'const at::BFloat16*', 'at::BFloat16*'], r'''
#include <torch/csrc/inductor/cpp_prefix.h>
extern "C"  void  kernel(const int8_t* in_ptr0,
                       const at::BFloat16* in_ptr1,
                       const at::BFloat16* in_ptr2,
                       at::BFloat16* out_ptr0)
{
    std::atomic<int> inductor_cpu_integer_div_error{0};
    inductor_cpu_integer_div_error_flag = &inductor_cpu_integer_div_error;
    #pragma omp parallel
    {
        int tid = omp_get_thread_num();
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(768L); x0+=static_cast<int64_t>(1L))
            {
                for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(64L); x1+=static_cast<int64_t>(16L))
                {
                    {
                        if(C10_LIKELY(x1 >= static_cast<int64_t>(0) && x1 < static_cast<int64_t>(64L)))
                        {
                            auto tmp0 = at::vec::Vectorized<int8_t>::loadu(in_ptr0 + static_cast<int64_t>(x1 + 64L*x0), static_cast<int64_t>(16));
                            auto tmp2 = in_ptr1[static_cast<int64_t>(x0)];
                            auto tmp6 = in_ptr2[static_cast<int64_t>(x0)];
                            auto tmp1 = at::vec::convert<float,2,int8_t,1>(tmp0);
                            auto tmp3 = c10::convert<float>(tmp2);
                            auto tmp4 = at::vec::VectorizedN<float,2>(tmp3);
                            auto tmp5 = tmp1 - tmp4;
                            auto tmp7 = c10::convert<float>(tmp6);
                            auto tmp8 = at::vec::VectorizedN<float,2>(tmp7);
                            auto tmp9 = tmp5 * tmp8;
                            auto tmp10 = at::vec::convert<at::BFloat16,1,float,2>(tmp9);
                            tmp10.store(out_ptr0 + static_cast<int64_t>(x1 + 64L*x0), static_cast<int64_t>(16));
                        }
                    }
                }
            }
        }
    }
    inductor_cpu_integer_div_error_flag = nullptr;
    inductor_cpu_throw_if_integer_div_error(inductor_cpu_integer_div_error);
}
''')


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
        arg0_1, arg1_1, arg2_1, arg3_1 = args
        args.clear()
        assert_size_stride(arg0_1, (192, 256), (256, 1), 'input')
        assert_size_stride(arg1_1, (192, 4, 1), (4, 1, 1), 'input')
        assert_size_stride(arg2_1, (192, 4, 1), (4, 1, 1), 'input')
        buf0 = empty_strided_cpu((192, 4, 64), (256, 64, 1), torch.bfloat16)
        assert_size_stride(arg3_1, (2, 256), (256, 1), 'input')
        cpp_fused__to_copy_mul_sub_view_0(arg0_1, arg1_1, arg2_1, buf0)
        del arg0_1
        del arg1_1
        del arg2_1
        buf1 = empty_strided_cpu((2, 192), (192, 1), torch.bfloat16)
        # Topologically Sorted Source Nodes: [q, to, sub, mul, view_1, linear], Original ATen: [aten.view, aten._to_copy, aten.sub, aten.mul, aten.t, aten.mm]
        extern_kernels.mm(arg3_1, reinterpret_tensor(buf0, (256, 192), (1, 256), 0), out=buf1)
        del arg3_1
        return (buf1, )

runner = Runner(partitions=[])
call = runner.call
recursively_apply_fns = runner.recursively_apply_fns


def get_args():
    from torch._dynamo.testing import rand_strided
    arg0_1 = rand_strided((192, 256), (256, 1), device='cpu', dtype=torch.int8)
    arg1_1 = rand_strided((192, 4, 1), (4, 1, 1), device='cpu', dtype=torch.bfloat16)
    arg2_1 = rand_strided((192, 4, 1), (4, 1, 1), device='cpu', dtype=torch.bfloat16)
    arg3_1 = rand_strided((2, 256), (256, 1), device='cpu', dtype=torch.bfloat16)
    return [arg0_1, arg1_1, arg2_1, arg3_1]


def benchmark_compiled_module(args, times=10, repeat=10):
    from torch._inductor.utils import print_performance
    fn = lambda: call(list(args))
    return print_performance(fn, times=times, repeat=repeat, device='cpu')


if __name__ == "__main__":
    from torch._inductor.wrapper_benchmark import compiled_module_main
    args = get_args()
    compiled_module_main('None', lambda times, repeat: benchmark_compiled_module(args, times=times, repeat=repeat))
