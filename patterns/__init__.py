"""The catalog of fusions, one module per family, applied in this order.

Each family module states what it matches, its constraints and its replacement candidates, and
exposes ``FAMILY = Family(name, flag, apply)``. Installed as ``zen_inductor.patterns``.
"""
from . import (
    add_rmsnorm, concat_linear, decode_attention, dense_matmul, dequant_matmul, linear_epilogue, prefill_attention,
    residual_add,
)

# dequant_matmul first: concat_linear merges the linears it leaves; dense_matmul then takes the
# remaining (and merged) bf16 linears; linear_epilogue fuses the SwiGLU into merged gate/up ones;
# residual_add then takes the residual adds after every linear, before add_rmsnorm reads the norms
# (which then read the fp32 stream); decode_attention and prefill_attention stand alone
FAMILIES = (dequant_matmul.FAMILY, concat_linear.FAMILY, dense_matmul.FAMILY, linear_epilogue.FAMILY,
            residual_add.FAMILY, add_rmsnorm.FAMILY, decode_attention.FAMILY, prefill_attention.FAMILY)
