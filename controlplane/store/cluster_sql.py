"""The SQL side of nodes, instances and API keys (a mixin of SqlRepository)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from controlplane.core.types import InstanceRole
from controlplane.store import codec, keys
from controlplane.store.errors import NotFound
from controlplane.store.records import (
    ApiKeyRecord,
    ApiKeyRole,
    InstanceState,
    NodeRecord,
    NodeState,
    RegisteredInstance,
)
from controlplane.store.sql_session import SqlUnitOfWork
from controlplane.store.tables import metadata

_nodes = metadata.tables["nodes"]
_instances = metadata.tables["instances"]
_api_keys = metadata.tables["api_keys"]


class ClusterSqlMixin:
    """Nodes, instances and API keys over `self.uow`; needs `self._dialect_insert`."""

    uow: SqlUnitOfWork
    _dialect_insert: Any

    def _upsert(self, table: Any, row: dict[str, Any]) -> None:
        statement = self._dialect_insert(table).values(row)
        statement = statement.on_conflict_do_update(
            index_elements=["id"], set_={k: statement.excluded[k] for k in row if k != "id"}
        )
        with self.uow.scope(write=True) as connection:
            connection.execute(statement)

    def upsert_node(self, node: NodeRecord) -> None:
        """See Repository.upsert_node."""
        self._upsert(
            _nodes,
            {
                "id": node.node_id,
                "address": node.address,
                "state": NodeState(node.state).value,
                "registered_s": node.registered_s,
                "last_heartbeat_s": node.last_heartbeat_s,
            },
        )

    def touch_node(self, node_id: str, at_s: float) -> None:
        """See Repository.touch_node."""
        statement = _nodes.update().where(_nodes.c.id == node_id).values(last_heartbeat_s=at_s)
        with self.uow.scope(write=True) as connection:
            if connection.execute(statement).rowcount != 1:
                raise NotFound(f"node {node_id!r} not found")

    def mark_node_down(self, node_id: str, at_s: float) -> list[str]:
        """See Repository.mark_node_down."""
        node_down = _nodes.update().where(_nodes.c.id == node_id).values(state=NodeState.DOWN)
        instances_down = (
            _instances.update()
            .where(_instances.c.node_id == node_id)
            .values(state=InstanceState.DOWN.value, updated_s=at_s)
            .returning(_instances.c.id)
        )
        with self.uow.scope(write=True) as connection:
            if connection.execute(node_down).rowcount != 1:
                raise NotFound(f"node {node_id!r} not found")
            return sorted(connection.execute(instances_down).scalars().all())

    def list_nodes(self) -> list[NodeRecord]:
        """See Repository.list_nodes."""
        with self.uow.scope(write=False) as connection:
            rows = connection.execute(select(_nodes).order_by(_nodes.c.id)).all()
        return [
            NodeRecord(r.id, r.address, NodeState(r.state), r.registered_s, r.last_heartbeat_s)
            for r in rows
        ]

    def upsert_instance(self, instance: RegisteredInstance) -> None:
        """See Repository.upsert_instance."""
        spec = instance.spec
        self._upsert(
            _instances,
            {
                "id": codec.join_ids([spec.instance_id], "instance_id"),
                "node_id": spec.node_id,
                "role": InstanceRole(spec.role).value,
                "state": InstanceState(instance.state).value,
                "tp": spec.tp,
                "device_indices": codec.join_ints(instance.device_indices),
                "kv_capacity_tokens": spec.kv_capacity_tokens,
                "updated_s": instance.updated_s,
            },
        )

    def create_api_key(
        self, role: ApiKeyRole, tenant: str, at_s: float
    ) -> tuple[ApiKeyRecord, str]:
        """See Repository.create_api_key."""
        codec.check_tenant(tenant)
        key_id, key = keys.generate_api_key()
        record = ApiKeyRecord(key_id, ApiKeyRole(role), tenant, at_s)
        row = {
            "id": key_id,
            "key_sha256": keys.key_sha256(key),
            "role": record.role.value,
            "tenant": tenant,
            "created_s": at_s,
            "revoked_s": None,
        }
        with self.uow.scope(write=True) as connection:
            connection.execute(_api_keys.insert(), row)
        return record, key

    def verify_api_key(self, key: str) -> ApiKeyRecord | None:
        """See Repository.verify_api_key."""
        key_id = keys.parse_key_id(key)
        if key_id is None:
            return None
        with self.uow.scope(write=False) as connection:
            row = connection.execute(
                select(_api_keys).where(_api_keys.c.id == key_id)
            ).one_or_none()
        if row is None or row.revoked_s is not None or not keys.digest_matches(key, row.key_sha256):
            return None
        return ApiKeyRecord(row.id, ApiKeyRole(row.role), row.tenant, row.created_s)

    def revoke_api_key(self, key_id: str, at_s: float) -> None:
        """See Repository.revoke_api_key."""
        statement = (
            _api_keys.update()
            .where(_api_keys.c.id == key_id)
            # Revoking twice keeps the first revocation time.
            .values(revoked_s=func.coalesce(_api_keys.c.revoked_s, at_s))
        )
        with self.uow.scope(write=True) as connection:
            if connection.execute(statement).rowcount != 1:
                raise NotFound(f"API key {key_id!r} not found")
