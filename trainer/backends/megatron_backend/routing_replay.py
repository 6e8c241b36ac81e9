"""``--use-routing-replay``: the experts every token was routed to while the old policy's log-probs were computed
are recorded, and the training forwards route each token to those experts again, so the policy ratio compares two
forwards of the same experts (slime's ``record`` and ``replay_forward`` stages; the reference pass routes freely).

It drives megatron-core's ``RouterReplay`` (one per MoE layer, made when the model is built with
``moe_enable_routing_replay``). Routes are kept per sample, ``[tokens, MoE layers, top-k]``, so a training
micro-batch may pack other samples together than the log-prob pass did (``--log-probs-max-tokens-per-gpu``,
dynamic batching, several optimizer steps per rollout). Under full activation recomputation the backward pass runs
each training forward's routers again: they replay the same routes (megatron-core's backward-replay stage, in the
order the forwards ran, which is the order their backwards run in, 1F1B included).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from trainer.backends.megatron_backend import context_parallel


class RoutingReplay:
    """The recorded routes of this rank's samples of one rollout, and the record/replay switch of each forward."""

    def __init__(self, *, replay_in_backward: bool = False) -> None:
        self.routes: dict[int, torch.Tensor] = {}
        self.mode: str | None = None
        # Full recomputation: the backward pass recomputes the forwards, routers included.
        self.replay_in_backward = replay_in_backward

    @staticmethod
    def forget_routers() -> None:
        """Drop the routers of a previously built model: megatron-core keeps every ``RouterReplay`` it makes in
        one process-wide list, in layer order."""
        from megatron.core.transformer.moe.router_replay import RouterReplay

        RouterReplay.clear_global_router_replay_instances()

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """The forwards inside record the routes of the samples they see (the old policy's log-prob pass)."""
        self.routes.clear()
        self.mode = "record"
        try:
            yield
        finally:
            self.mode = None

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """The forwards inside route every token as recorded (the training forwards); the routes are dropped after.
        Without a recording (no old-policy pass: ``sft_loss``, ``--disable-compute-advantages-and-returns``) they
        route freely."""
        self.mode = "replay" if self.routes else None
        try:
            yield
        finally:
            if self.mode == "replay" and self.replay_in_backward:
                from megatron.core.transformer.moe.router_replay import RouterReplay

                RouterReplay.clear_global_indices()
                RouterReplay.clear_global_router_replay_action()
            self.mode = None
            self.routes.clear()

    @contextlib.contextmanager
    def forward(
        self,
        positions: list[int],
        lengths: list[int],
        *,
        padding: int = 0,
        sequence_group: Any = None,
        split: context_parallel.RowSplit | None = None,
    ) -> Iterator[None]:
        """Around one forward of the packed samples ``positions`` (local sample positions) of ``lengths`` tokens,
        followed by ``padding`` filler tokens. Under sequence parallelism (``sequence_group``, the tensor-parallel
        group) each rank routes only its slice of the row: recorded slices are gathered, replayed ones cut. Under
        context parallelism (``split``, which holds its own padding) each rank routes its share of the row: recorded
        shares are gathered over the context-parallel group, replayed ones taken from the whole row's routes."""
        if self.mode is None:
            yield
            return
        from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

        if self.mode == "replay":
            missing = [i for i in positions if i not in self.routes]
            if missing:
                raise RuntimeError(
                    f"--use-routing-replay: no routes were recorded for local samples {missing}; the old policy's "
                    "log-prob pass records them before training"
                )
            routes = torch.cat([self.routes[i] for i in positions]).long()
            # Filler tokens take any valid distinct experts; their outputs are dropped.
            topk = torch.arange(routes.shape[2], device=routes.device)
            if split is not None:
                padded = topk.expand(split.padded_tokens, routes.shape[1], -1).clone()
                padded[split.token_index] = routes
                routes = padded[split.local_index]
            elif padding:
                routes = torch.cat([routes, topk.expand(padding, routes.shape[1], -1)])
            if sequence_group is not None:
                routes = routes.chunk(dist.get_world_size(sequence_group))[dist.get_rank(sequence_group)]
            RouterReplay.set_replay_data(list(routes.unbind(dim=1)))
            RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        else:
            RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
        try:
            yield
            if self.mode == "record":
                recorded = RouterReplay.get_recorded_data()
                if any(r is None for r in recorded):
                    raise RuntimeError("--use-routing-replay: a MoE layer recorded no routes in this forward")
                routes = torch.stack(recorded, dim=1)
                if sequence_group is not None:
                    parts = [torch.empty_like(routes) for _ in range(dist.get_world_size(sequence_group))]
                    dist.all_gather(parts, routes.contiguous(), group=sequence_group)
                    routes = torch.cat(parts)
                if split is not None:
                    routes = context_parallel.gather_rows(routes[: split.local_tokens], split)
                # int32 per sample: half of what int64 indices would keep through the rollout.
                routes = routes[: sum(lengths)].to(torch.int32)
                for i, part in zip(positions, routes.split(lengths), strict=True):
                    self.routes[i] = part
        finally:
            if self.mode == "replay" and self.replay_in_backward:
                # Kept for the backward pass: each router's replay list holds this forward's routes behind those
                # of earlier forwards whose backwards have not run yet.
                RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)
            else:
                RouterReplay.clear_global_indices()
                RouterReplay.clear_global_router_replay_action()
