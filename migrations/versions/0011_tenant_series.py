"""Per-tenant job series and noisy-neighbour flags: tenant_series, tenant_flags; job_metrics
indexed by bucket (a log pass reads back the buckets its new runs fall in).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 18:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('tenant_series',
    sa.Column('series', sa.String(length=16), nullable=False),
    sa.Column('hour', sa.DateTime(timezone=True), nullable=False),
    sa.Column('tenant', sa.String(length=200), nullable=False),
    sa.Column('value', sa.BigInteger(), nullable=False),
    sa.Column('seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('series', 'hour', 'tenant', name=op.f('pk_tenant_series'))
    )
    op.create_index('ix_tenant_series_tenant', 'tenant_series', ['series', 'tenant', 'hour'],
                    unique=False)
    op.create_table('tenant_flags',
    sa.Column('series', sa.String(length=16), nullable=False),
    sa.Column('hour', sa.DateTime(timezone=True), nullable=False),
    sa.Column('tenant', sa.String(length=200), nullable=False),
    sa.Column('value', sa.BigInteger(), nullable=False),
    sa.Column('median', sa.Numeric(precision=24, scale=6), nullable=False),
    sa.PrimaryKeyConstraint('series', 'hour', 'tenant', name=op.f('pk_tenant_flags'))
    )
    op.create_index('ix_tenant_flags_hour', 'tenant_flags', ['hour'], unique=False)
    op.create_index('ix_job_metrics_bucket', 'job_metrics', ['bucket'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_job_metrics_bucket', table_name='job_metrics')
    op.drop_index('ix_tenant_flags_hour', table_name='tenant_flags')
    op.drop_table('tenant_flags')
    op.drop_index('ix_tenant_series_tenant', table_name='tenant_series')
    op.drop_table('tenant_series')
