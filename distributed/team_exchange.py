"""The views an RA team's members make for each other, sent to the ranks that train on them.

With the exchange on, each member of a team makes every copy of its share of a step's samples (one decode a
sample for the whole team) and the rows travel by all_to_all within the team's process group, after the copy to
the device the views make anyway: over NVLink between the GPUs of a node, over the network for a team whose
contiguous ranks span two nodes (teams of R ranks or more need not line up with nodes). Which rows go where is
the plan's (EpochPlan.routes), so every rank trains on exactly the micro batch it would have made itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from deit_pipe.tensor_fields import TensorFields


class TeamExchange:
    def __init__(self, teams: list[range], rank: int):
        # Every rank creates every team's group, in one order: torch.distributed's rule for new_group.
        groups = [dist.new_group(list(team)) for team in teams]
        self.group = next(group for team, group in zip(teams, groups, strict=True) if rank in team)

    def own(self, made: TensorFields, stored: TensorFields | None, routes, device: torch.device):
        """This rank's micro batch and store rows (None without a store) from what its loader made (routes.made's
        views): moved to the device, exchanged, in its order. Nothing here waits for the device's queued work:
        the loader's batches are pinned on a GPU run, and so is the order."""
        order = torch.tensor(routes.order)
        if device.type == "cuda":
            order = order.pin_memory()
        order = order.to(device, non_blocking=True)
        return tuple(None if rows is None else rows.to(device, non_blocking=True)._map(
            lambda field: self._rows(field, routes)[order]) for rows in (made, stored))

    def _rows(self, rows: torch.Tensor, routes) -> torch.Tensor:
        received = rows.new_empty((sum(routes.recv_splits), *rows.shape[1:]))
        dist.all_to_all_single(received, rows.contiguous(), routes.recv_splits, routes.send_splits, group=self.group)
        return received
