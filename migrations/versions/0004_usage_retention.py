"""The usage_retention watermark written by prune-usage.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21 07:06:00.169800
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('usage_retention',
    sa.Column('name', sa.String(length=32), nullable=False),
    sa.Column('pruned_before', sa.DateTime(timezone=True), nullable=False),
    sa.Column('pruned_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_usage_retention'))
    )


def downgrade() -> None:
    op.drop_table('usage_retention')
