"""Export delivery per point: export_deliveries; export_checkpoints.retry_at.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 09:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('export_deliveries',
    sa.Column('exporter', sa.String(length=32), nullable=False),
    sa.Column('bucket', sa.DateTime(timezone=True), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('job', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('value', sa.Numeric(precision=24, scale=6), nullable=True),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('doubt_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('exporter', 'bucket', 'name', 'job', 'status', name=op.f('pk_export_deliveries'))
    )
    with op.batch_alter_table('export_checkpoints', schema=None) as batch_op:
        batch_op.add_column(sa.Column('retry_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('export_checkpoints', schema=None) as batch_op:
        batch_op.drop_column('retry_at')

    op.drop_table('export_deliveries')
