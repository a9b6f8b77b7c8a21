"""moe.v1.Admin: this router's measured expert load, the expert placement, and live re-placement.

The router does not know how its experts are hosted (router never imports cluster): whoever built the
backend hands in a `PlacementControl` of plain callables, or None when every expert runs in this
process. Statuses are chosen here: INVALID_ARGUMENT for a malformed request or plan
(`InvalidPlanError`), FAILED_PRECONDITION for a plan the running hosts cannot move to
(`RebalanceRefusedError`) and for placement calls on the local backend.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from protos import admin_pb2, admin_pb2_grpc
from router.expert_load import LoadWindow

log = logging.getLogger(__name__)

SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
NO_HOSTS = "the local backend has no expert hosts to re-place: every expert runs in the router process"


class InvalidPlanError(ValueError):
    """The plan is not a placement plan, or not one for this model (answered INVALID_ARGUMENT)."""


class RebalanceRefusedError(RuntimeError):
    """A valid plan the running hosts cannot move to; nothing was changed (answered FAILED_PRECONDITION)."""


@dataclass(frozen=True, slots=True)
class PlacementControl:
    """The expert hosts' placement, reached through the code that started them. Both block (run off the loop)."""

    placement: Callable[[], str]  # -> the plan served now, as JSON
    # (plan JSON, per-host byte budget or None) -> report JSON; raises InvalidPlanError or RebalanceRefusedError
    rebalance: Callable[[str, int | None], str]


class AdminService(admin_pb2_grpc.AdminServicer):
    """moe.v1.Admin over a LoadWindow and, with expert hosts, their PlacementControl."""

    def __init__(self, load: LoadWindow, experts_per_token: int, control: PlacementControl | None) -> None:
        self.load, self.experts_per_token, self.control = load, experts_per_token, control

    async def GetLoad(self, request: admin_pb2.GetLoadRequest, context: Any) -> admin_pb2.GetLoadResponse:
        try:
            load = self.load.over(request.window_s)
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{err} (0: since the router started)")
        # Every token gets exactly K experts in every layer, so layer 0's rows count the tokens.
        tokens = sum(load.rows[0]) // self.experts_per_token
        return admin_pb2.GetLoadResponse(
            layers=len(load.rows), experts=len(load.rows[0]), load=[admin_pb2.LayerLoad(rows=r) for r in load.rows],
            window_s=load.window_s, tokens=tokens, experts_per_token=self.experts_per_token)

    async def GetPlacement(self, request: admin_pb2.GetPlacementRequest, context: Any
                           ) -> admin_pb2.GetPlacementResponse:
        control = await self._control(context)
        try:
            plan = await asyncio.get_running_loop().run_in_executor(None, control.placement)
        except Exception as err:  # the controller is restarting or unreachable
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the controller did not answer ({type(err).__name__}: "
                                f"{err}); retry shortly")
        return admin_pb2.GetPlacementResponse(plan_json=plan)

    async def Rebalance(self, request: admin_pb2.RebalanceRequest, context: Any) -> admin_pb2.RebalanceResponse:
        control = await self._control(context)
        if not request.plan_json.strip():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "plan_json is empty: send a placement plan "
                                "(the JSON of `moe-cluster plan --out`)")
        memory = request.host_memory_bytes if request.HasField("host_memory_bytes") else None
        if memory == 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "host_memory_bytes=0: give a positive budget, "
                                "or leave it unset for no limit")
        log.info("re-placement requested (host memory budget: %s bytes)", memory)
        try:
            report = await asyncio.get_running_loop().run_in_executor(None, control.rebalance, request.plan_json,
                                                                      memory)
        except InvalidPlanError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except RebalanceRefusedError as err:
            log.warning("re-placement refused: %s", err)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        except Exception as err:  # a host or the controller failed mid-way: the steps done so far stay served
            log.error("re-placement failed: %s: %s", type(err).__name__, err)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"re-placement failed part-way ({type(err).__name__}: "
                                f"{err}); the cluster serves the steps completed so far (GetPlacement shows them)")
        return admin_pb2.RebalanceResponse(report_json=report)

    async def _control(self, context: Any) -> PlacementControl:
        if self.control is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NO_HOSTS)
        assert self.control is not None  # abort raised
        return self.control


def add_to_server(service: AdminService) -> tuple[Callable[[grpc.aio.Server], None], str]:
    """The (adder, service name) pair router.api.build_server takes in `extra`."""
    return (lambda server: admin_pb2_grpc.add_AdminServicer_to_server(service, server)), SERVICE_NAME
