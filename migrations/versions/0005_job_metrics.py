"""Job metrics from logs: log_checkpoints, log_runs, job_metrics, export_checkpoints.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21 07:12:38.285353
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('export_checkpoints',
    sa.Column('exporter', sa.String(length=32), nullable=False),
    sa.Column('sent_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('graphs_posted', sa.Boolean(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('exporter', name=op.f('pk_export_checkpoints'))
    )
    op.create_table('job_metrics',
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('bucket', sa.DateTime(timezone=True), nullable=False),
    sa.Column('job', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('value', sa.Numeric(precision=24, scale=6), nullable=False),
    sa.PrimaryKeyConstraint('name', 'bucket', 'job', 'status', name=op.f('pk_job_metrics'))
    )
    op.create_table('log_checkpoints',
    sa.Column('path', sa.String(length=1000), nullable=False),
    sa.Column('device', sa.BigInteger(), nullable=False),
    sa.Column('inode', sa.BigInteger(), nullable=False),
    sa.Column('head', sa.String(length=64), nullable=False),
    sa.Column('offset', sa.BigInteger(), nullable=False),
    sa.Column('malformed', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('path', name=op.f('pk_log_checkpoints'))
    )
    op.create_table('log_runs',
    sa.Column('run_id', sa.String(length=64), nullable=False),
    sa.Column('job', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('logical_time', sa.DateTime(timezone=True), nullable=True),
    sa.Column('duration_s', sa.Float(), nullable=False),
    sa.Column('counts', sa.JSON(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('run_id', name=op.f('pk_log_runs'))
    )
    with op.batch_alter_table('log_runs', schema=None) as batch_op:
        batch_op.create_index('ix_log_runs_finished_at', ['finished_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('log_runs', schema=None) as batch_op:
        batch_op.drop_index('ix_log_runs_finished_at')

    op.drop_table('log_runs')
    op.drop_table('log_checkpoints')
    op.drop_table('job_metrics')
    op.drop_table('export_checkpoints')
