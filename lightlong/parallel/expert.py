"""Expert parallelism: each MoE layer's experts spread over the ranks of a group, tokens
sent to them and back by all-to-all (dropless), and the load-balancing loss over the tokens
of every rank.

Rank r of R holds experts [r·L, (r + 1)·L), L = E / R, and its own tokens (the group is also
a data-parallel group: each rank runs different tokens). Per MoE layer, each rank

1. routes its tokens (the router is replicated) and sorts the assignments by expert, which
   also sorts them by the rank holding the expert;
2. sends every rank the count of assignments for each of its experts (one all-to-all of
   E ints), so that each rank knows how many rows it gets, from whom, for which expert;
3. sends the assignments' inputs to the ranks holding their experts (all-to-all with
   variable splits), regroups the rows it got by expert, runs each local expert once, and
   sends the outputs back in the order they came (the inverse all-to-all);
4. combines each token's k outputs with its router weights.

Both all-to-alls are differentiable (their backward is the inverse exchange), so a local
expert's gradient collects every rank's tokens: it equals the single-process gradient over
the concatenated batch when each rank backpropagates its share of the loss. Communication
per layer and direction: the assignments' rows (N·k·D values per rank), nothing else.

# N tokens, D model dim, E experts (L on each rank), k experts per token, A = N·k
# assignments, R ranks
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

from lightlong.ops.moe import ExpertFn, Routing, load_balancing_loss, mix_experts, run_experts

if TYPE_CHECKING:  # parallel sits below nn and model: their classes are types here only
    from lightlong.model.hybrid import HybridLM


@dataclass(frozen=True)
class ExpertParallel:
    """Which experts of a MoE layer this rank holds. Build it with `ExpertParallel.of`."""

    group: dist.ProcessGroup
    """The expert-parallel group; its ranks hold different tokens."""
    rank: int
    """This rank's position in the group."""
    world: int
    """R, the group's size: the expert-parallel degree."""
    num_experts: int
    """E, the layer's experts over all ranks."""

    @property
    def num_local_experts(self) -> int:
        """L = E / R experts on each rank."""
        return self.num_experts // self.world

    @property
    def first_expert(self) -> int:
        """Global index of this rank's first expert (its experts are contiguous)."""
        return self.rank * self.num_local_experts

    @classmethod
    def of(cls, num_experts: int, group: dist.ProcessGroup | None = None) -> ExpertParallel:
        """E experts over the ranks of `group` (None: the default group); the group's size
        must divide E."""
        group = group if group is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        if num_experts % world:
            raise ValueError(
                f"the expert-parallel degree (parallel.expert, the group's size) {world} must "
                f"divide num_experts (num_local_experts in the checkpoint's config) = "
                f"{num_experts}"
            )
        return cls(group, dist.get_rank(group), world, num_experts)


def grouped_experts_parallel(
    x: Tensor, r: Routing, expert_fn: ExpertFn, ep: ExpertParallel
) -> Tensor:
    """`lightlong.ops.moe.grouped_experts` with the experts spread over the ranks of
    ep.group; every rank calls it with its own tokens.

    Args:
        x: [N, D] this rank's tokens (N may differ between ranks).
        r: their routing over all E experts (`lightlong.ops.moe.route`).
        expert_fn: expert_fn(e, x_e [n_e, D]) -> [n_e, D] runs this rank's expert e (its
            global index), on rows from every rank.
        ep: the experts' placement (`ExpertParallel.of`).

    Returns:
        [N, D] in x's dtype: each token's k expert outputs weighted by its router weights.
    """
    return mix_experts(x, r, lambda x_A: _exchange(x_A, r.counts, expert_fn, ep))


def _exchange(x_A: Tensor, counts: list[int], expert_fn: ExpertFn, ep: ExpertParallel) -> Tensor:
    """Sends this rank's assignments x_A [A, D] (sorted by expert, counts[e] for expert e) to
    the ranks holding their experts, runs the local experts on what arrives, and returns the
    outputs [A, D] in x_A's order."""
    R, L = ep.world, ep.num_local_experts
    send_E = torch.tensor(counts, dtype=torch.int64, device=x_A.device)
    recv_RL = torch.empty_like(send_E)  # rows each rank sends for each local expert
    dist.all_to_all_single(recv_RL, send_E, group=ep.group)
    recv_RL = recv_RL.view(R, L)
    send_R = send_E.view(R, L).sum(dim=1).tolist()
    recv_R = recv_RL.sum(dim=1).tolist()
    x_M = funcol.all_to_all_single_autograd(x_A.contiguous(), recv_R, send_R, ep.group)
    # the M rows arrive by rank, then expert; regroup them by expert, then rank
    sizes_RL = recv_RL.flatten()
    starts_LR = (sizes_RL.cumsum(0) - sizes_RL).view(R, L).T.flatten()
    sizes_LR = recv_RL.T.flatten()
    shift_LR = starts_LR - (sizes_LR.cumsum(0) - sizes_LR)
    order_M = torch.arange(x_M.shape[0], device=x_A.device) + shift_LR.repeat_interleave(sizes_LR)
    y_M = run_experts(x_M.index_select(0, order_M), recv_RL.sum(dim=0).tolist(), expert_fn,
                      first=ep.first_expert)  # fmt: skip
    y_M = y_M.index_select(0, torch.argsort(order_M))  # back in arrival order
    return funcol.all_to_all_single_autograd(y_M, send_R, recv_R, ep.group)


def global_load_balancing_loss(r: Routing, group: dist.ProcessGroup | None) -> Tensor:
    """`lightlong.ops.moe.load_balancing_loss` over the tokens of every rank of `group`
    (None: the default group), as one process would compute it over all of them: the
    assignment counts, router-probability sums and token counts are summed over the ranks.

    Every rank gets the same loss. The sum is differentiable and its backward sums too, so
    when each rank backpropagates loss / R, the router gradients of the ranks add up to the
    single-process one (with loss, each is R times its share, as DDP's averaging expects).
    """
    group = group if group is not None else dist.group.WORLD
    return load_balancing_loss(r, lambda t: dist_fn.all_reduce(t, group=group))


def apply_expert_parallel(model: HybridLM, group: dist.ProcessGroup | None = None) -> None:
    """Spreads every MoE layer's experts over the ranks of `group` (None: the default group),
    in place: this rank keeps experts [rank·L, (rank + 1)·L), L = E / R (the rest are freed),
    and its MoE layers exchange tokens with the other ranks' by all-to-all.

    Apply it after loading full weights (the rank keeps its slice); every rank calls forward
    and backward together, each with its own tokens. The router and every other parameter
    stay replicated, and the load-balancing loss becomes the group's
    (`global_load_balancing_loss`). State-dict keys keep global expert indices
    (`...block_sparse_moe.experts.{e}.w1.weight`); `full_state_dict` gathers every expert.

    Gradients, with each rank backpropagating its `out.loss` (its tokens' loss plus the
    group's aux loss): the replicated parameters' gradients are that rank's part, averaged
    over the data-parallel group as usual (DDP); the expert parameters (`expert_parameters`)
    are never all-reduced over this group and hold the sum over its ranks: divide them by
    the data-parallel size for the average (with several expert-parallel groups, sum them
    first over the ranks holding the same experts). Or backpropagate out.loss / R and sum
    the replicated gradients instead of averaging them, as the tests do.

    Raises ValueError when R does not divide the number of experts, or on a second call.
    """
    ep = ExpertParallel.of(model.config.num_experts, group)
    local = range(ep.first_expert, ep.first_expert + ep.num_local_experts)
    for layer in model.model.layers:
        moe = layer.block_sparse_moe
        if moe.expert_parallel is not None:
            raise ValueError("expert parallelism is already applied to this model")
        moe.experts = nn.ModuleDict({str(e): moe.experts[e] for e in local})
        moe.expert_parallel = ep


def _sharded_moes(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of each MoE layer that `apply_expert_parallel` sharded."""
    for name, m in model.named_modules():
        if getattr(m, "expert_parallel", None) is not None:
            yield name, m


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """This rank's expert parameters by qualified name: the ones that expert parallelism
    shards. Keep them out of the data-parallel all-reduce (DDP's parameters to ignore,
    FSDP's `ignored_params`); every other parameter is replicated."""
    prefixes = tuple(f"{name}.experts." for name, _ in _sharded_moes(model))
    return {n: p for n, p in model.named_parameters() if n.startswith(prefixes)}


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """`model.state_dict()` with every expert of every sharded MoE layer, all-gathered from
    the ranks of its group (every rank calls it, and every rank gets the whole dict): the
    released names and order, as the unsharded model has them, for `save_weights`.

    Holds all experts on every rank at once; a model without expert parallelism gives its
    own state dict."""
    state = model.state_dict()
    gathered: dict[str, dict[str, Tensor]] = {}  # experts' key prefix -> its full entries
    for name, moe in _sharded_moes(model):
        ep: ExpertParallel = moe.expert_parallel
        local = list(moe.experts.values())
        parts = {}
        for key in local[0].state_dict():
            mine = torch.stack([expert.state_dict()[key] for expert in local])  # [L, ...]
            every = mine.new_empty((ep.num_experts, *mine.shape[1:]))  # [E, ...]
            dist.all_gather_single(every, mine, group=ep.group)
            parts[key] = every
        gathered[f"{name}.experts."] = {
            f"{name}.experts.{e}.{key}": parts[key][e]
            for e in range(ep.num_experts)
            for key in parts
        }
    prefixes = tuple(gathered)
    full: dict[str, Tensor] = {}
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            full[key] = value
        else:  # the layer's first expert key brings all E experts, in order
            full.update(gathered.pop(prefix, {}))
    return full
