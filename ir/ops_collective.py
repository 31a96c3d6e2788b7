"""The tensor-parallel collectives of the IR (``passes/shard_tensor_parallel.py`` inserts them): ALL_REDUCE and
ALL_GATHER, defined into ``ops.OPS`` like every op (``kiln/ir/__init__.py`` loads this module)."""
from __future__ import annotations

import torch

from .ops import REQUIRED, ShapeError, define
from .types import FLOAT_DTYPES, TType, dim, shape_str

COLLECTIVE_GROUPS = ("tp",)  # "tp": the default process group of torch.distributed, every rank of it


def _process_group_size(op: str, a) -> int:
    """The ranks the collective runs over: ``a["world"]``, checked against torch.distributed's default group."""
    import torch.distributed as dist

    if a["group"] not in COLLECTIVE_GROUPS:
        raise ValueError(f"{op}: unknown group {a['group']!r} (one of {', '.join(COLLECTIVE_GROUPS)})")
    if a["world"] == 1:
        return 1
    got = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if got != a["world"]:
        raise RuntimeError(f"{op}: the graph was sharded for {a['world']} ranks, the process group has {got} "
                           "(torch.distributed.init_process_group with the world size the model was compiled for)")
    return got


def _infer_collective(op: str):
    def infer(ins, a):
        (x,) = ins
        if a["group"] not in COLLECTIVE_GROUPS or not isinstance(a["world"], int) or a["world"] < 1:
            raise ShapeError(f"{op}: group {a['group']!r} over {a['world']!r} ranks")
        if op == "ALL_REDUCE":
            if a["op"] != "sum" or x.dtype not in FLOAT_DTYPES:
                raise ShapeError(f"ALL_REDUCE: op {a['op']!r} on {x.dtype} (sum of a float tensor)")
            return x
        ax, stride = a["axis"], a["stride"]
        if not 0 <= ax < len(x.shape) or stride < 1 or a["world"] % stride:
            raise ShapeError(f"ALL_GATHER: axis {ax}, stride {stride} over {a['world']} ranks on {shape_str(x.shape)}")
        shape = list(x.shape)
        shape[ax] = dim(shape[ax] * (a["world"] // stride))
        return TType(tuple(shape), x.dtype)
    return infer


def _all_reduce(x, a):
    """sum over the ranks of x (a new tensor; x itself at one rank)."""
    import torch.distributed as dist

    if _process_group_size("ALL_REDUCE", a) == 1:
        return x[0]
    y = x[0].contiguous().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def _all_gather(x, a):
    """concat(piece of rank 0, piece of rank stride, piece of rank 2 * stride, ...) along ``axis``."""
    import torch.distributed as dist

    world = _process_group_size("ALL_GATHER", a)
    if world == 1:
        return x[0]
    t = x[0].contiguous()
    pieces = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(pieces, t)
    return torch.cat(pieces[:: a["stride"]], a["axis"])


# the collectives of a tensor-parallel graph (passes/shard_tensor_parallel.py); ``world``: the ranks of ``group`` the
# graph was sharded for (the reference refuses a process group of another size; 1: identity). ALL_GATHER keeps the
# pieces of ranks 0, stride, 2 * stride, ...: ``stride`` > 1 when neighbouring ranks hold copies of one piece
define("ALL_REDUCE", 1, "compute", _infer_collective("ALL_REDUCE"), _all_reduce, group="tp", op="sum", world=REQUIRED)
define("ALL_GATHER", 1, "compute", _infer_collective("ALL_GATHER"), _all_gather, group="tp", axis=REQUIRED, world=REQUIRED,
       stride=1)
COLLECTIVE_OPS = frozenset({"ALL_REDUCE", "ALL_GATHER"})
