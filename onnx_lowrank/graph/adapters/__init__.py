"""One adapter per op type, by op type (the order is the order `--ops` lists them in help)."""

from .conv import ConvAdapter, ConvTransposeAdapter
from .gather import GatherAdapter
from .gemm import GemmAdapter
from .matmul import MatMulAdapter

ADAPTERS = {
    adapter.op_type: adapter
    for adapter in (GemmAdapter(), MatMulAdapter(), ConvAdapter(), ConvTransposeAdapter(), GatherAdapter())
}
