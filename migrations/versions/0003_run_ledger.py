"""The run ledger (job_runs): one row per attempt of a job for (job, logical time, shard).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21 06:40:29.415468
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('job_runs',
    sa.Column('run_id', sa.String(length=64), nullable=False),
    sa.Column('job', sa.String(length=64), nullable=False),
    sa.Column('logical_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('scheduled_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('shard', sa.String(length=16), nullable=False),
    sa.Column('trigger', sa.String(length=16), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('counts', sa.JSON(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('running', 'succeeded', 'partial', 'failed', 'skipped')", name=op.f('ck_job_runs_status')),
    sa.CheckConstraint('"trigger" IN (\'schedule\', \'manual\', \'backfill\', \'catch-up\', \'retry\')', name=op.f('ck_job_runs_trigger')),
    sa.PrimaryKeyConstraint('run_id', name=op.f('pk_job_runs'))
    )
    with op.batch_alter_table('job_runs', schema=None) as batch_op:
        batch_op.create_index('ix_job_runs_key', ['job', 'logical_time', 'shard'], unique=False)
        batch_op.create_index('ix_job_runs_started_at', ['started_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('job_runs', schema=None) as batch_op:
        batch_op.drop_index('ix_job_runs_started_at')
        batch_op.drop_index('ix_job_runs_key')

    op.drop_table('job_runs')
