"""The run ledger records each run's deadline (its start plus the job's expected bound), so a run
still ``running`` past it can raise an alert; an index finds the running rows.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 20:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('job_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('deadline', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index('ix_job_runs_status', ['status'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('job_runs', schema=None) as batch_op:
        batch_op.drop_index('ix_job_runs_status')
        batch_op.drop_column('deadline')
