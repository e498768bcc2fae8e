"""The KV hand-off on this node: TransferKv starts a send and/or a receive, StartDecode resumes
the destination, and transfer reports retire the copies (wire semantics:
`dataplane.agent.commands`). Pure: no I/O, no clock."""

from __future__ import annotations

from dataplane.agent.routes import RequestTable, Route, TransferInfo
from dataplane.agent.steps import CommandError, Node, Retryable, Step, resident_route
from dataplane.worker import messages as m
from protos.pecsched.v1 import cluster_pb2


def start_transfer(
    step: Step, node: Node, table: RequestTable, cmd: cluster_pb2.TransferKv
) -> None:
    """Record the transfer and add its SendKv and/or RecvKv to `step`; CommandError names the
    bad field (Retryable when the source does not hold the request)."""
    if not cmd.transfer_id:
        raise CommandError("transfer_id must not be empty")
    if cmd.timeout_s < 0:
        raise CommandError(f"timeout_s must be >= 0, got {cmd.timeout_s}")
    src, dst = node.index_of(cmd.source_instance_id), node.index_of(cmd.destination_instance_id)
    if src is None and dst is None:
        raise CommandError(
            f"neither source_instance_id {cmd.source_instance_id!r} nor "
            f"destination_instance_id {cmd.destination_instance_id!r} is on this node"
        )
    if src is not None and src == dst:
        raise CommandError("source_instance_id equals destination_instance_id")
    store = cmd.rendezvous_address or node.rendezvous_address
    group_id = cmd.group_id or f"kv/{cmd.transfer_id}"
    timeout_s = cmd.timeout_s or node.group_timeout_s
    route = table.routes.get(cmd.request_id)
    if src is not None:
        if route is None or src not in route.workers:
            raise Retryable(
                f"request {cmd.request_id!r} is not resident on {cmd.source_instance_id}"
            )
    elif route is None:
        route = table.routes[cmd.request_id] = Route(set(), 0, 0)
    table.transfers[cmd.transfer_id] = TransferInfo(
        cmd.request_id, cmd.source_instance_id, cmd.destination_instance_id
    )
    args = (cmd.request_id, cmd.transfer_id, group_id)
    same_node = src is not None and dst is not None  # CUDA: IPC between the two workers
    if src is not None:
        step.send(src, m.SendKv(*args, cmd.destination_instance_id, store, timeout_s, same_node))
    if dst is not None:
        route.workers.add(dst)
        step.send(dst, m.RecvKv(*args, cmd.source_instance_id, store, timeout_s, same_node))


def start_decode(step: Step, node: Node, table: RequestTable, cmd: cluster_pb2.StartDecode) -> None:
    """Add the StartDecode for the worker that decodes (named, the transfer's destination, or
    the one holder) to `step`; the route learns the offset of KV from another node."""
    route = resident_route(table, cmd.request_id, "start_decode")
    info = table.transfers.get(cmd.transfer_id) if cmd.transfer_id else None
    if cmd.instance_id:
        index = node.index_of(cmd.instance_id)
        if index is None:
            raise CommandError(
                f"instance_id {cmd.instance_id!r} is not an instance of node {node.node_id!r}"
            )
        if index not in route.workers:
            raise Retryable(f"request {cmd.request_id!r} is not on {cmd.instance_id}")
    elif info is not None:
        index = node.index_of(info.destination_id)
        if index is None:
            raise CommandError(f"transfer {cmd.transfer_id!r} ends on another node")
    elif len(route.workers) == 1:
        index = next(iter(route.workers))
    else:
        raise CommandError(f"transfer_id {cmd.transfer_id!r} is unknown here")
    if route.prompt_tokens == 0 and cmd.generated_token_ids:
        # KV from another node: it carries exactly the first generated token.
        route.offset_tokens = len(cmd.generated_token_ids) - 1
    step.send(index, m.StartDecode(cmd.request_id))


def transfer_report(table: RequestTable, index: int, report: m.KvTransferUpdate) -> bool:
    """Bookkeeping of worker `index`'s transfer report; True when it becomes an event."""
    if report.state == "failed":
        if not report.is_source:
            # The receiver freed its partial import. With nothing of the request left here
            # (the source is elsewhere), a later StartPrefill or TransferKv finds no route.
            table.release(report.request_id, index)
        if report.transfer_id in table.failed_transfers:
            return False
        table.failed_transfers.add(report.transfer_id)
        return True
    if report.state == "done":
        if report.is_source:
            table.release(report.request_id, index)  # the source copy is freed
            return False
        return True
    return report.is_source  # "transferring": once, from the sender
