"""Tensor parallelism: each vLLM parameter's sharding as ``torch.distributed.tensor`` placements, and
``gather_param``, which rebuilds the full logical tensor inside a trace.

vLLM labels both dimensions of a linear weight, so the sharded dimension comes from the layer class
(one table, :data:`PLACEMENTS`). Fused layers (QKV, merged gate/up) hold one shard of each logical part
back to back, and grouped-query attention may replicate KV heads across ranks; the gather regroups the
parts and drops replicas. Vocabulary layers are padded per rank; the gather strips the padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import Placement, Replicate, Shard

# Layer class name -> placement of (weight, bias). Looked up along the MRO, most specific class first,
# so subclasses (QKVParallelLinear, MergedColumnParallelLinear, ParallelLMHead, ...) inherit their base's row.
PLACEMENTS: dict[str, tuple[Placement, Placement]] = {
    "ColumnParallelLinear": (Shard(0), Shard(0)),
    "RowParallelLinear": (Shard(1), Replicate()),
    "VocabParallelEmbedding": (Shard(0), Shard(0)),
    "ReplicatedLinear": (Replicate(), Replicate()),
}


@dataclass(frozen=True)
class ShardingSpec:
    """How one rank's local parameter relates to the full logical tensor.

    ``parts``: local sizes along the sharded dim of each logical part stored back to back (one part for
    plain layers; q/k/v or gate/up for fused ones). ``replicas``: for each part, how many consecutive
    ranks hold the same shard (KV heads replicated when there are fewer of them than ranks).
    ``logical_size``: the full size along the sharded dim after stripping vocabulary padding.
    """

    placement: Placement
    parts: tuple[int, ...] = ()
    replicas: tuple[int, ...] = ()
    logical_size: int | None = None
    vocab_mapping: tuple[int, ...] | None = field(default=None, repr=False)

    @property
    def sharded(self) -> bool:
        return isinstance(self.placement, Shard)


def tp_size(module: torch.nn.Module) -> int:
    """The tensor-parallel world size a layer was built for (1 for layers vLLM does not shard)."""
    return int(getattr(module, "tp_size", 1) or 1)


def placement_of(module: torch.nn.Module, param_name: str = "weight") -> Placement:
    """The placement of ``module.<param_name>`` across tensor-parallel ranks (``Replicate()`` when unsharded)."""
    if tp_size(module) == 1:
        return Replicate()
    for cls in type(module).__mro__:
        if cls.__name__ in PLACEMENTS:
            weight, bias = PLACEMENTS[cls.__name__]
            return weight if param_name == "weight" else bias
    return Replicate()


def sharding_spec(module: torch.nn.Module, param_name: str = "weight") -> ShardingSpec:
    """The full sharding description of ``module.<param_name>`` (see :class:`ShardingSpec`)."""
    placement = placement_of(module, param_name)
    local = getattr(module, param_name)
    vocab = _is_vocab_layer(module)
    logical = getattr(module, "org_vocab_size", None) if vocab else None
    if not isinstance(placement, Shard):
        return ShardingSpec(placement, logical_size=logical)
    dim = placement.dim
    size = local.shape[dim]
    if vocab:
        mapping = module.get_sharded_to_full_mapping()
        return ShardingSpec(placement, (size,), (1,), logical, tuple(mapping) if mapping is not None else None)
    if hasattr(module, "num_kv_head_replicas") and hasattr(module, "head_size"):  # fused q/k/v
        q = module.num_heads * module.head_size
        k = module.num_kv_heads * module.head_size
        v = module.num_kv_heads * getattr(module, "v_head_size", module.head_size)
        replicas = module.num_kv_head_replicas
        return ShardingSpec(placement, (q, k, v), (1, replicas, replicas))
    output_sizes = getattr(module, "output_sizes", None)
    if dim == 0 and output_sizes and len(output_sizes) > 1:  # merged column layers (gate/up)
        n = tp_size(module)
        return ShardingSpec(placement, tuple(s // n for s in output_sizes), (1,) * len(output_sizes))
    return ShardingSpec(placement, (size,), (1,))


REPACKED = "_nnterp_repacked"  # set by an engine worker on parameters whose values are in a kernel's layout


def gather_param(module: torch.nn.Module, param_name: str = "weight", group=None) -> torch.Tensor:
    """The full logical ``module.<param_name>``: all-gathered over tensor-parallel ranks, fused parts
    regrouped, replicated KV shards dropped, vocabulary padding stripped.

    A collective: call it on every rank of the group (inside an nnsight trace the intervention body runs
    on every rank, so it does). With one rank it only strips padding.
    """
    param = getattr(module, param_name)
    if getattr(param, REPACKED, False):
        raise RuntimeError(
            f"{type(module).__name__}.{param_name} is in a kernel's layout on this engine: vLLM's CPU backend "
            "prepacks MoE expert weights for its grouped GEMM (same shape, reordered values). Read it from the "
            "HF model instead."
        )
    local = param.detach()
    if local.numel() == 0:
        raise RuntimeError(
            f"{type(module).__name__}.{param_name} is empty on this engine: vLLM's CPU backend repacks linear "
            "weights into its matmul kernel's format and drops the original. Read it from the HF model instead."
        )
    spec = sharding_spec(module, param_name)
    if not spec.sharded:
        return local if spec.logical_size is None else local[: spec.logical_size]
    dim = spec.placement.dim
    shards = _all_gather_shards(local, spec.placement, group if group is not None else _tp_group())
    parts = [torch.cat(pieces[::replicas], dim) for pieces, replicas in zip(
        zip(*(shard.split(spec.parts, dim) for shard in shards)), spec.replicas)]
    full = torch.cat(parts, dim)
    if spec.vocab_mapping is not None:
        full = full.index_select(dim, torch.tensor(spec.vocab_mapping, device=full.device))
    return full if spec.logical_size is None else full.narrow(dim, 0, spec.logical_size)


def _all_gather_shards(local: torch.Tensor, placement: Shard, group) -> list[torch.Tensor]:
    """Each rank's shard, in rank order, through a DTensor on a device mesh over ``group``."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor

    mesh = DeviceMesh.from_group(group, local.device.type)
    full = DTensor.from_local(local.contiguous(), mesh, [placement], run_check=False).full_tensor()
    return list(full.chunk(mesh.size(), placement.dim))


def _tp_group():
    from vllm.distributed import get_tp_group

    return get_tp_group().device_group


def _is_vocab_layer(module: torch.nn.Module) -> bool:
    return any(cls.__name__ == "VocabParallelEmbedding" for cls in type(module).__mro__)
