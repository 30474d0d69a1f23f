"""Usage tables: recorded usage (tenants, hosts, metric dictionaries, hour bitmaps, state
changes) and frozen usage (usage_snapshots, usage_snapshot_roles, snapshot_hours).

Revision ID: 0001
Revises:
Create Date: 2026-11-21 05:36:07.228054
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('snapshot_hours',
    sa.Column('hour', sa.DateTime(timezone=True), nullable=False),
    sa.Column('snapshotted_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('run_id', sa.String(length=64), nullable=False),
    sa.Column('tenants', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('hour', name=op.f('pk_snapshot_hours'))
    )
    op.create_table('tenants',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tenants')),
    sa.UniqueConstraint('key', name=op.f('uq_tenants_key'))
    )
    op.create_table('hosts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_hosts_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hosts')),
    sa.UniqueConstraint('tenant_id', 'key', name=op.f('uq_hosts_tenant_id_key'))
    )
    op.create_table('metric_names',
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('namespace', sa.String(length=16), nullable=False),
    sa.Column('name', sa.String(length=800), nullable=False),
    sa.Column('ordinal', sa.Integer(), nullable=False),
    sa.CheckConstraint("namespace IN ('host', 'service')", name=op.f('ck_metric_names_namespace')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_metric_names_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('tenant_id', 'namespace', 'name', name=op.f('pk_metric_names')),
    sa.UniqueConstraint('tenant_id', 'namespace', 'ordinal', name=op.f('uq_metric_names_tenant_id_namespace_ordinal'))
    )
    op.create_table('monitor_events',
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('monitor', sa.String(length=255), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('present', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_monitor_events_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('tenant_id', 'monitor', 'at', 'present', name=op.f('pk_monitor_events'))
    )
    op.create_table('plan_changes',
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('plan', sa.String(length=16), nullable=False),
    sa.CheckConstraint("plan IN ('free', 'trial', 'standard')", name=op.f('ck_plan_changes_plan')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_plan_changes_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('tenant_id', 'at', name=op.f('pk_plan_changes'))
    )
    op.create_table('role_events',
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('role', sa.String(length=255), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_role_events_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('tenant_id', 'role', 'at', 'enabled', name=op.f('pk_role_events'))
    )
    op.create_table('service_hours',
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('hour', sa.DateTime(timezone=True), nullable=False),
    sa.Column('metric_count', sa.Integer(), nullable=False),
    sa.Column('metric_bits', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_service_hours_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('tenant_id', 'hour', name=op.f('pk_service_hours'))
    )
    with op.batch_alter_table('service_hours', schema=None) as batch_op:
        batch_op.create_index('ix_service_hours_hour', ['hour'], unique=False)

    op.create_table('usage_snapshot_roles',
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('hour', sa.DateTime(timezone=True), nullable=False),
    sa.Column('role', sa.String(length=255), nullable=False),
    sa.Column('hosts', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_usage_snapshot_roles_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('tenant_id', 'hour', 'role', name=op.f('pk_usage_snapshot_roles'))
    )
    with op.batch_alter_table('usage_snapshot_roles', schema=None) as batch_op:
        batch_op.create_index('ix_usage_snapshot_roles_hour', ['hour'], unique=False)

    op.create_table('usage_snapshots',
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('hour', sa.DateTime(timezone=True), nullable=False),
    sa.Column('plan', sa.String(length=16), nullable=True),
    sa.Column('standard_hosts', sa.Integer(), nullable=False),
    sa.Column('micro_hosts', sa.Integer(), nullable=False),
    sa.Column('standard_overage', sa.Integer(), nullable=False),
    sa.Column('micro_overage', sa.Integer(), nullable=False),
    sa.Column('host_metrics', sa.Integer(), nullable=False),
    sa.Column('service_metrics', sa.Integer(), nullable=False),
    sa.Column('monitors', sa.Integer(), nullable=False),
    sa.Column('standard_metric_limit', sa.Integer(), nullable=False),
    sa.Column('micro_metric_limit', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_usage_snapshots_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('tenant_id', 'hour', name=op.f('pk_usage_snapshots'))
    )
    with op.batch_alter_table('usage_snapshots', schema=None) as batch_op:
        batch_op.create_index('ix_usage_snapshots_hour', ['hour'], unique=False)

    op.create_table('host_hours',
    sa.Column('host_id', sa.Integer(), nullable=False),
    sa.Column('hour', sa.DateTime(timezone=True), nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('metric_count', sa.Integer(), nullable=False),
    sa.Column('metric_bits', sa.LargeBinary(), nullable=False),
    sa.CheckConstraint("kind IN ('standard', 'micro')", name=op.f('ck_host_hours_kind')),
    sa.ForeignKeyConstraint(['host_id'], ['hosts.id'], name=op.f('fk_host_hours_host_id_hosts')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_host_hours_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('host_id', 'hour', name=op.f('pk_host_hours'))
    )
    with op.batch_alter_table('host_hours', schema=None) as batch_op:
        batch_op.create_index('ix_host_hours_hour_tenant', ['hour', 'tenant_id'], unique=False)

    op.create_table('role_member_events',
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('role', sa.String(length=255), nullable=False),
    sa.Column('host_id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('member', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['host_id'], ['hosts.id'], name=op.f('fk_role_member_events_host_id_hosts')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_role_member_events_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('tenant_id', 'role', 'host_id', 'at', 'member', name=op.f('pk_role_member_events'))
    )


def downgrade() -> None:
    op.drop_table('role_member_events')
    with op.batch_alter_table('host_hours', schema=None) as batch_op:
        batch_op.drop_index('ix_host_hours_hour_tenant')

    op.drop_table('host_hours')
    with op.batch_alter_table('usage_snapshots', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_snapshots_hour')

    op.drop_table('usage_snapshots')
    with op.batch_alter_table('usage_snapshot_roles', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_snapshot_roles_hour')

    op.drop_table('usage_snapshot_roles')
    with op.batch_alter_table('service_hours', schema=None) as batch_op:
        batch_op.drop_index('ix_service_hours_hour')

    op.drop_table('service_hours')
    op.drop_table('role_events')
    op.drop_table('plan_changes')
    op.drop_table('monitor_events')
    op.drop_table('metric_names')
    op.drop_table('hosts')
    op.drop_table('tenants')
    op.drop_table('snapshot_hours')
