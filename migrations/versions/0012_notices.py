"""Estimates, budget alerts and the webhook outbox: usage_estimates, budget_alerts,
budget_alert_states, outbox_events, webhook_endpoints, webhook_deliveries (billing/notices.py).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 20:13:17.307351
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('budget_alerts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('measure', sa.String(length=16), nullable=False),
    sa.Column('threshold', sa.Numeric(precision=24, scale=6), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_by', sa.String(length=255), nullable=False),
    sa.CheckConstraint("measure IN ('amount', 'standard_units', 'micro_units')", name=op.f('ck_budget_alerts_measure')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_budget_alerts_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_budget_alerts')),
    sa.UniqueConstraint('tenant_id', 'measure', name=op.f('uq_budget_alerts_tenant_id_measure'))
    )
    op.create_table('outbox_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('event_id', sa.String(length=40), nullable=False),
    sa.Column('type', sa.String(length=32), nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('run_id', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_outbox_events_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox_events')),
    sa.UniqueConstraint('event_id', name=op.f('uq_outbox_events_event_id'))
    )
    with op.batch_alter_table('outbox_events', schema=None) as batch_op:
        batch_op.create_index('ix_outbox_events_tenant_id', ['tenant_id', 'id'], unique=False)

    op.create_table('usage_estimates',
    sa.Column('period', sa.String(length=7), nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('as_of', sa.DateTime(timezone=True), nullable=False),
    sa.Column('hours_in_month', sa.Integer(), nullable=False),
    sa.Column('hours_elapsed', sa.Integer(), nullable=False),
    sa.Column('paid_hours', sa.Integer(), nullable=False),
    sa.Column('catalog_version', sa.String(length=32), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('minor_units', sa.Integer(), nullable=False),
    sa.Column('mtd_standard_units', sa.Integer(), nullable=False),
    sa.Column('mtd_micro_units', sa.Integer(), nullable=False),
    sa.Column('mtd_total', sa.BigInteger(), nullable=False),
    sa.Column('projected_standard_units', sa.Integer(), nullable=False),
    sa.Column('projected_micro_units', sa.Integer(), nullable=False),
    sa.Column('projected_total', sa.BigInteger(), nullable=False),
    sa.Column('method', sa.String(length=16), nullable=False),
    sa.Column('computed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('run_id', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_usage_estimates_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('period', 'tenant_id', 'as_of', name=op.f('pk_usage_estimates'))
    )
    with op.batch_alter_table('usage_estimates', schema=None) as batch_op:
        batch_op.create_index('ix_usage_estimates_as_of', ['as_of'], unique=False)

    op.create_table('webhook_endpoints',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=True),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('secret', sa.Text(), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=255), nullable=False),
    sa.Column('disabled_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_webhook_endpoints_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_endpoints'))
    )
    op.create_table('budget_alert_states',
    sa.Column('alert_id', sa.Integer(), nullable=False),
    sa.Column('period', sa.String(length=7), nullable=False),
    sa.Column('crossed', sa.Boolean(), nullable=False),
    sa.Column('crossings', sa.Integer(), nullable=False),
    sa.Column('value', sa.Numeric(precision=24, scale=6), nullable=False),
    sa.Column('as_of', sa.DateTime(timezone=True), nullable=False),
    sa.Column('changed_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['alert_id'], ['budget_alerts.id'], name=op.f('fk_budget_alert_states_alert_id_budget_alerts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('alert_id', 'period', name=op.f('pk_budget_alert_states'))
    )
    op.create_table('webhook_deliveries',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('event_pk', sa.Integer(), nullable=False),
    sa.Column('endpoint_id', sa.Integer(), nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=12), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_status', sa.Integer(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'delivered', 'dead')", name=op.f('ck_webhook_deliveries_status')),
    sa.ForeignKeyConstraint(['endpoint_id'], ['webhook_endpoints.id'], name=op.f('fk_webhook_deliveries_endpoint_id_webhook_endpoints')),
    sa.ForeignKeyConstraint(['event_pk'], ['outbox_events.id'], name=op.f('fk_webhook_deliveries_event_pk_outbox_events')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_webhook_deliveries_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_deliveries')),
    sa.UniqueConstraint('event_pk', 'endpoint_id', name=op.f('uq_webhook_deliveries_event_pk_endpoint_id'))
    )
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.create_index('ix_webhook_deliveries_queue', ['status', 'endpoint_id', 'tenant_id', 'event_pk'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.drop_index('ix_webhook_deliveries_queue')

    op.drop_table('webhook_deliveries')
    op.drop_table('budget_alert_states')
    op.drop_table('webhook_endpoints')
    with op.batch_alter_table('usage_estimates', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_estimates_as_of')

    op.drop_table('usage_estimates')
    with op.batch_alter_table('outbox_events', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_events_tenant_id')

    op.drop_table('outbox_events')
    op.drop_table('budget_alerts')
