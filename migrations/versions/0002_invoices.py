"""Invoices with revisions, lines, adjustments and the billing-run audit; triggers that make
final and void invoices immutable.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 05:46:26.491088
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


# Final and void invoices never change: these triggers refuse UPDATE/DELETE of such an invoice
# and any INSERT/UPDATE/DELETE of its lines, whatever code (or person) tries.
_SQLITE_TRIGGERS = [
    """CREATE TRIGGER trg_invoices_immutable BEFORE UPDATE ON invoices
       WHEN OLD.status IN ('final', 'void')
       BEGIN SELECT RAISE(ABORT, 'invoice is final or void and cannot be changed'); END""",
    """CREATE TRIGGER trg_invoices_undeletable BEFORE DELETE ON invoices
       WHEN OLD.status IN ('final', 'void')
       BEGIN SELECT RAISE(ABORT, 'invoice is final or void and cannot be deleted'); END""",
    """CREATE TRIGGER trg_invoice_lines_insert BEFORE INSERT ON invoice_lines
       WHEN (SELECT status FROM invoices WHERE id = NEW.invoice_id) IN ('final', 'void')
       BEGIN SELECT RAISE(ABORT, 'invoice is final or void and cannot be changed'); END""",
    """CREATE TRIGGER trg_invoice_lines_update BEFORE UPDATE ON invoice_lines
       WHEN (SELECT status FROM invoices WHERE id = OLD.invoice_id) IN ('final', 'void')
       BEGIN SELECT RAISE(ABORT, 'invoice is final or void and cannot be changed'); END""",
    """CREATE TRIGGER trg_invoice_lines_delete BEFORE DELETE ON invoice_lines
       WHEN (SELECT status FROM invoices WHERE id = OLD.invoice_id) IN ('final', 'void')
       BEGIN SELECT RAISE(ABORT, 'invoice is final or void and cannot be changed'); END""",
]
_SQLITE_DROP = [
    "DROP TRIGGER IF EXISTS trg_invoices_immutable",
    "DROP TRIGGER IF EXISTS trg_invoices_undeletable",
    "DROP TRIGGER IF EXISTS trg_invoice_lines_insert",
    "DROP TRIGGER IF EXISTS trg_invoice_lines_update",
    "DROP TRIGGER IF EXISTS trg_invoice_lines_delete",
]
_PG_TRIGGERS = [
    """CREATE FUNCTION hostmeter_invoice_immutable() RETURNS trigger AS $$
       BEGIN
         IF OLD.status IN ('final', 'void') THEN
           RAISE EXCEPTION 'invoice % is % and cannot be changed', OLD.id, OLD.status
             USING ERRCODE = 'integrity_constraint_violation';
         END IF;
         IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
         RETURN NEW;
       END $$ LANGUAGE plpgsql""",
    """CREATE FUNCTION hostmeter_invoice_line_immutable() RETURNS trigger AS $$
       DECLARE s text;
       BEGIN
         SELECT status INTO s FROM invoices
          WHERE id = CASE WHEN TG_OP = 'INSERT' THEN NEW.invoice_id ELSE OLD.invoice_id END;
         IF s IN ('final', 'void') THEN
           RAISE EXCEPTION 'invoice is % and cannot be changed', s
             USING ERRCODE = 'integrity_constraint_violation';
         END IF;
         IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
         RETURN NEW;
       END $$ LANGUAGE plpgsql""",
    """CREATE TRIGGER trg_invoices_immutable BEFORE UPDATE OR DELETE ON invoices
       FOR EACH ROW EXECUTE FUNCTION hostmeter_invoice_immutable()""",
    """CREATE TRIGGER trg_invoice_lines_immutable BEFORE INSERT OR UPDATE OR DELETE
       ON invoice_lines FOR EACH ROW EXECUTE FUNCTION hostmeter_invoice_line_immutable()""",
]
_PG_DROP = [
    "DROP TRIGGER IF EXISTS trg_invoice_lines_immutable ON invoice_lines",
    "DROP TRIGGER IF EXISTS trg_invoices_immutable ON invoices",
    "DROP FUNCTION IF EXISTS hostmeter_invoice_line_immutable()",
    "DROP FUNCTION IF EXISTS hostmeter_invoice_immutable()",
]


def _run(statements: list[str]) -> None:
    for statement in statements:
        op.execute(statement)


def upgrade() -> None:
    op.create_table('billing_runs',
    sa.Column('run_id', sa.String(length=64), nullable=False),
    sa.Column('period', sa.String(length=7), nullable=False),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('dry_run', sa.Boolean(), nullable=False),
    sa.Column('catalog_version', sa.String(length=32), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('actor', sa.String(length=255), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('summary', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('run_id', name=op.f('pk_billing_runs'))
    )
    with op.batch_alter_table('billing_runs', schema=None) as batch_op:
        batch_op.create_index('ix_billing_runs_period', ['period'], unique=False)

    op.create_table('invoices',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('period', sa.String(length=7), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=8), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('catalog_version', sa.String(length=32), nullable=False),
    sa.Column('standard_units', sa.Integer(), nullable=False),
    sa.Column('micro_units', sa.Integer(), nullable=False),
    sa.Column('subtotal', sa.BigInteger(), nullable=False),
    sa.Column('tax', sa.BigInteger(), nullable=False),
    sa.Column('total', sa.BigInteger(), nullable=False),
    sa.Column('minor_units', sa.Integer(), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=255), nullable=False),
    sa.Column('run_id', sa.String(length=64), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('finalized_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('voided_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('draft', 'final', 'void')", name=op.f('ck_invoices_status')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_invoices_tenant_id_tenants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_invoices')),
    sa.UniqueConstraint('tenant_id', 'period', 'revision', name=op.f('uq_invoices_tenant_id_period_revision'))
    )
    with op.batch_alter_table('invoices', schema=None) as batch_op:
        batch_op.create_index('ix_invoices_period_status', ['period', 'status'], unique=False)

    op.create_table('invoice_adjustments',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('invoice_id', sa.Integer(), nullable=False),
    sa.Column('adjusts_invoice_id', sa.Integer(), nullable=False),
    sa.Column('standard_units', sa.Integer(), nullable=False),
    sa.Column('micro_units', sa.Integer(), nullable=False),
    sa.Column('tax', sa.BigInteger(), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=255), nullable=False),
    sa.ForeignKeyConstraint(['adjusts_invoice_id'], ['invoices.id'], name=op.f('fk_invoice_adjustments_adjusts_invoice_id_invoices')),
    sa.ForeignKeyConstraint(['invoice_id'], ['invoices.id'], name=op.f('fk_invoice_adjustments_invoice_id_invoices')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_invoice_adjustments'))
    )
    with op.batch_alter_table('invoice_adjustments', schema=None) as batch_op:
        batch_op.create_index('ix_invoice_adjustments_invoice_id', ['invoice_id'], unique=False)

    op.create_table('invoice_lines',
    sa.Column('invoice_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('item', sa.String(length=64), nullable=False),
    sa.Column('unit', sa.String(length=8), nullable=False),
    sa.Column('units', sa.Integer(), nullable=False),
    sa.Column('unit_price', sa.BigInteger(), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('basis', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['invoice_id'], ['invoices.id'], name=op.f('fk_invoice_lines_invoice_id_invoices')),
    sa.PrimaryKeyConstraint('invoice_id', 'position', name=op.f('pk_invoice_lines'))
    )

    if op.get_bind().dialect.name == "postgresql":
        _run(_PG_TRIGGERS)
    else:
        _run(_SQLITE_TRIGGERS)

def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _run(_PG_DROP)
    else:
        _run(_SQLITE_DROP)
    op.drop_table('invoice_lines')
    with op.batch_alter_table('invoice_adjustments', schema=None) as batch_op:
        batch_op.drop_index('ix_invoice_adjustments_invoice_id')

    op.drop_table('invoice_adjustments')
    with op.batch_alter_table('invoices', schema=None) as batch_op:
        batch_op.drop_index('ix_invoices_period_status')

    op.drop_table('invoices')
    with op.batch_alter_table('billing_runs', schema=None) as batch_op:
        batch_op.drop_index('ix_billing_runs_period')

    op.drop_table('billing_runs')
