"""The views an RA team's members make for each other, sent to the ranks that train on them.

With the exchange on, each member of a team makes every copy of its share of a step's samples (one decode a
sample for the whole team) and the rows travel by all_to_all within the team's process group: on a GPU node over
NVLink, after the copy to the device the views make anyway. Which rows go where is the plan's (EpochPlan.routes),
so every rank trains on exactly the micro batch it would have made itself.
"""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.distributed as dist

from deit_pipe.tensor_fields import TensorFields


class TeamExchange:
    def __init__(self, teams: list[range], rank: int):
        # Every rank creates every team's group, in one order: torch.distributed's rule for new_group.
        groups = [dist.new_group(list(team)) for team in teams]
        self.group = next(group for team, group in zip(teams, groups, strict=True) if rank in team)

    def __call__(self, made: TensorFields, routes) -> TensorFields:
        """The rows of `made` (routes.made's views, on this rank's device) exchanged: this rank's micro batch."""
        order = torch.tensor(routes.order, device=getattr(made, fields(made)[0].name).device)
        return made._map(lambda rows: self._rows(rows, routes)[order])

    def _rows(self, rows: torch.Tensor, routes) -> torch.Tensor:
        received = rows.new_empty((sum(routes.recv_splits), *rows.shape[1:]))
        dist.all_to_all_single(received, rows.contiguous(), routes.recv_splits, routes.send_splits, group=self.group)
        return received
