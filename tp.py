"""Tensor parallelism for the language model over torch.distributed (gloo on the CPU, NCCL on GPUs), in the way of
gpt-fast's tp.py.

    torchrun --nproc-per-node 2 bench.py --model qwen2-vl-72b ...

    rank, world = tp.init()                              # from torchrun's environment: one GPU a rank
    model, processor = load.load(path, device=tp.device(), dtype=torch.bfloat16, shard=(rank, world))
    result = std.generate(model, inputs, 256, k=1024)    # every rank, the same inputs: the same tokens come out

load.load(..., shard=) builds a rank's part alone (never the whole model), the same as shard() of the whole.

A rank holds, in every layer, some of the KV heads with their query heads (the q, k and v rows and biases of those
heads) and the matching columns of the output projection; and 1/world of the gate and up rows with the matching
columns of the down projection. The output and down projections then give partial sums, which one all-reduce each
adds across the ranks: two a layer. The embedding, the norms, the head and the vision tower are whole on every rank,
so every rank computes the same logits and picks the same tokens. Each rank's KV cache holds its own KV heads, and
StD's selection, made per KV head, runs on each rank for its own heads.

A decode step's all-reduces are small (a few rows of `dim` numbers) and there are two a layer, so their latency,
not their bandwidth, is what costs. With two GPU ranks, init() therefore sets up PyTorch's symmetric memory: each rank
writes its partial sums into a buffer the other GPU maps, and one kernel reads both buffers and adds (a "one-shot"
all-reduce, which CUDA graphs capture). Messages past ONE_SHOT_BYTES (prefill) and dtypes the kernel lacks go
through NCCL; with two ranks both give the same bits.
"""
import logging
import os

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn


ONE_SHOT_BYTES = 1 << 21  # the symmetric buffer: room for a decode step's message, not for a prefill's
ONE_SHOT_DTYPES = (torch.bfloat16, torch.float32)  # what PyTorch's one-shot kernel adds
_one_shot = None  # (symmetric buffer, group name) once init() set it up


class _SymmetricInputNote(logging.Filter):
    """torch.compile (2.11) warns, for every graph, that it could not place the one-shot operator's input in
    symmetric memory itself: the input is our buffer, which is there already."""

    def filter(self, record):
        return "Failed to realize the input as a symmetric memory buffer" not in record.getMessage()


def launched() -> bool:
    """Whether this process is one of several that torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(one_shot: bool = True) -> tuple[int, int]:
    """Join the process group torchrun describes (NCCL with one GPU a rank, else gloo); -> (rank, world size).

    one_shot: on GPUs with two ranks, small all-reduces read the other rank's buffer directly (symmetric memory)
    instead of going through NCCL. The one-shot kernel needs no NVLink multicast, so TORCH_SYMM_MEM_DISABLE_MULTICAST
    is set unless the environment says otherwise."""
    global _one_shot
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    _one_shot = None
    if one_shot and torch.cuda.is_available() and world == 2:
        import torch.distributed._symmetric_memory as symm_mem

        if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy"):
            raise ImportError(f"the one-shot all-reduce needs torch 2.8 or newer (this is {torch.__version__}): "
                              "pass one_shot=False (bench.py --all-reduce nccl)")
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        group = dist.group.WORLD
        buffer = symm_mem.empty(ONE_SHOT_BYTES, dtype=torch.uint8, device=device())
        symm_mem.rendezvous(buffer, group.group_name)
        _one_shot = (buffer, group.group_name)
        logging.getLogger("torch._inductor.comm_lowering").addFilter(_SymmetricInputNote())
    return rank, world


def close() -> None:
    """Leave the process group (and let the symmetric buffer go first)."""
    global _one_shot
    _one_shot = None
    dist.destroy_process_group()


def all_reduce_kind() -> str:
    """How the decode steps' all-reduces run: "one-shot" (symmetric memory), or the process group's backend."""
    return "one-shot" if _one_shot is not None else dist.get_backend()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of x over the ranks, each element's bits the same whatever else the call holds (the batch invariance
    of kernels.py). With two ranks an element's sum is one addition, which commutes, so any all-reduce keeps it.
    With more, all-reduce algorithms add in an order set by where the element sits in the message (a one-token step
    and a verify pass would round differently), so the partial sums are gathered and added in rank order.
    Functional collectives and symmetric-memory operators, which torch.compile traces and CUDA graphs capture."""
    group = dist.group.WORLD
    if dist.get_world_size(group) == 2:
        if _one_shot is not None and x.dtype in ONE_SHOT_DTYPES and x.numel() * x.element_size() <= ONE_SHOT_BYTES:
            buffer, name = _one_shot
            symmetric = buffer[:x.numel() * x.element_size()].view(x.dtype).view(x.shape)
            return torch.ops.symm_mem.one_shot_all_reduce_copy(symmetric, x.contiguous(), "sum", name)
        return funcol.all_reduce(x, "sum", group)
    parts = funcol.all_gather_tensor(x.contiguous(), 0, group).view(-1, *x.shape)
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def plan(config, rank: int, world: int) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """This rank's part of each decoder linear layer: name in a layer -> (rows, columns) of its weight, None = all.

    A KV head's query heads are contiguous, so this rank's query heads are too.
    """
    if config.n_kv_heads % world or config.intermediate_size % world:
        raise ValueError(f"{world} ranks cannot share {config.n_kv_heads} KV heads and {config.intermediate_size} MLP "
                         "columns evenly")
    D, heads, kv_heads = config.head_dim, config.n_heads // world, config.n_kv_heads // world
    columns = config.intermediate_size // world
    q = torch.arange(rank * heads * D, (rank + 1) * heads * D)
    k = config.n_heads * D + torch.arange(rank * kv_heads * D, (rank + 1) * kv_heads * D)
    v = k + config.n_kv_heads * D
    gate = torch.arange(rank * columns, (rank + 1) * columns)
    return {"attn.qkv": (torch.cat([q, k, v]), None), "attn.o_proj": (None, q),
            "mlp.gate_up": (torch.cat([gate, config.intermediate_size + gate]), None), "mlp.down_proj": (None, gate)}


def shard(model, rank: int, world: int) -> None:
    """Keep this rank's part of every decoder layer of `model` (model.Qwen2VL), in place. (load.load(...,
    shard=(rank, world)) builds the same part without the whole model.)"""
    c = model.config
    parts = plan(c, rank, world)
    for block in model.layers:
        for name, (rows, columns) in parts.items():
            owner, attr = name.split(".")
            module = getattr(block, owner)
            setattr(module, attr, part(getattr(module, attr), rows, columns))
        block.attn.n_heads, block.attn.n_kv_heads = c.n_heads // world, c.n_kv_heads // world
        block.partial_sums = all_reduce
    model.partial_sums = all_reduce


def part(linear: nn.Linear, rows=None, columns=None) -> nn.Linear:
    """A new linear layer of some rows (output features) or columns (input features) of `linear`."""
    if columns is not None and linear.bias is not None:
        raise ValueError("a layer split by input columns gives partial sums: its bias would be added once a rank")
    weight = linear.weight.detach()
    weight = weight[rows.to(weight.device)] if rows is not None else weight[:, columns.to(weight.device)]
    bias = linear.bias is not None
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias, device=weight.device, dtype=weight.dtype)
    out.weight.data.copy_(weight)
    if bias:
        out.bias.data.copy_(linear.bias.detach()[rows.to(weight.device)])
    return out
