"""Final and void invoices sealed against every statement: adjustments guarded like lines, no
REPLACE over a final invoice (SQLite), no TRUNCATE while a final invoice exists (PostgreSQL).

Revision 0002's triggers refuse UPDATE and DELETE of a final or void invoice and any change of its
lines. Three ways around them remained:

- ``invoice_adjustments`` had no trigger: the adjustment a final revision carries could be
  updated or deleted; and an UPDATE could move a draft's line into a final invoice (only the
  line's old invoice was checked);
- SQLite's ``INSERT OR REPLACE`` deletes the conflicting row without firing DELETE triggers
  (unless ``recursive_triggers`` is on), so it could replace a final invoice: a BEFORE INSERT
  trigger refuses any insert that collides with a final or void invoice, whatever the pragma;
- PostgreSQL's ``TRUNCATE`` fires no row triggers: a statement trigger refuses to truncate
  invoices, lines or adjustments while any final or void invoice exists (also when reached
  through ``TRUNCATE … CASCADE``).

What the triggers cannot stop is the tables' owner disabling or dropping them. On PostgreSQL the
application therefore runs as a role that does not own the tables (``hostmeter db grant``; see
the README, "Configuration and the database").

Revision ID: 0007
Revises: 0005
Create Date: 2026-12-02 19:00:00.000000
"""

from __future__ import annotations

from alembic import op

revision = '0007'
down_revision = '0005'
branch_labels = None
depends_on = None


_SEALED = "('final', 'void')"

_SQLITE = [
    f"""CREATE TRIGGER trg_invoice_adjustments_insert BEFORE INSERT ON invoice_adjustments
       WHEN (SELECT status FROM invoices WHERE id = NEW.invoice_id) IN {_SEALED}
       BEGIN SELECT RAISE(ABORT, 'invoice is final or void and cannot be changed'); END""",
    f"""CREATE TRIGGER trg_invoice_adjustments_update BEFORE UPDATE ON invoice_adjustments
       WHEN (SELECT status FROM invoices WHERE id = OLD.invoice_id) IN {_SEALED}
         OR (SELECT status FROM invoices WHERE id = NEW.invoice_id) IN {_SEALED}
       BEGIN SELECT RAISE(ABORT, 'invoice is final or void and cannot be changed'); END""",
    f"""CREATE TRIGGER trg_invoice_adjustments_delete BEFORE DELETE ON invoice_adjustments
       WHEN (SELECT status FROM invoices WHERE id = OLD.invoice_id) IN {_SEALED}
       BEGIN SELECT RAISE(ABORT, 'invoice is final or void and cannot be changed'); END""",
    # INSERT OR REPLACE (and REPLACE INTO) would delete the colliding final row silently.
    f"""CREATE TRIGGER trg_invoices_no_replace BEFORE INSERT ON invoices
       WHEN EXISTS (SELECT 1 FROM invoices
                     WHERE (id = NEW.id OR (tenant_id = NEW.tenant_id AND period = NEW.period
                                            AND revision = NEW.revision))
                       AND status IN {_SEALED})
       BEGIN SELECT RAISE(ABORT, 'invoice is final or void and cannot be replaced'); END""",
    f"""CREATE TRIGGER trg_invoice_adjustments_no_replace BEFORE INSERT ON invoice_adjustments
       WHEN EXISTS (SELECT 1 FROM invoice_adjustments a JOIN invoices i ON i.id = a.invoice_id
                     WHERE a.id = NEW.id AND i.status IN {_SEALED})
       BEGIN SELECT RAISE(ABORT, 'invoice is final or void and cannot be changed'); END""",
    # 0002 checked the line's old invoice only: moving a draft's line into a final one passed.
    f"""CREATE TRIGGER trg_invoice_lines_update_target BEFORE UPDATE ON invoice_lines
       WHEN (SELECT status FROM invoices WHERE id = NEW.invoice_id) IN {_SEALED}
       BEGIN SELECT RAISE(ABORT, 'invoice is final or void and cannot be changed'); END""",
]
_SQLITE_DROP = [
    "DROP TRIGGER IF EXISTS trg_invoice_lines_update_target",
    "DROP TRIGGER IF EXISTS trg_invoice_adjustments_no_replace",
    "DROP TRIGGER IF EXISTS trg_invoices_no_replace",
    "DROP TRIGGER IF EXISTS trg_invoice_adjustments_delete",
    "DROP TRIGGER IF EXISTS trg_invoice_adjustments_update",
    "DROP TRIGGER IF EXISTS trg_invoice_adjustments_insert",
]

_PG = [
    # 0002's line function read OLD.invoice_id only on UPDATE: moving a draft's line into a final
    # invoice passed. This one checks the invoice a row leaves and the one it joins.
    f"""CREATE FUNCTION hostmeter_invoice_child_immutable() RETURNS trigger AS $$
       DECLARE s text;
       BEGIN
         IF TG_OP IN ('UPDATE', 'DELETE') THEN
           SELECT status INTO s FROM invoices WHERE id = OLD.invoice_id;
           IF s IN {_SEALED} THEN
             RAISE EXCEPTION 'invoice is % and cannot be changed', s
               USING ERRCODE = 'integrity_constraint_violation';
           END IF;
         END IF;
         IF TG_OP IN ('INSERT', 'UPDATE') THEN
           SELECT status INTO s FROM invoices WHERE id = NEW.invoice_id;
           IF s IN {_SEALED} THEN
             RAISE EXCEPTION 'invoice is % and cannot be changed', s
               USING ERRCODE = 'integrity_constraint_violation';
           END IF;
           RETURN NEW;
         END IF;
         RETURN OLD;
       END $$ LANGUAGE plpgsql""",
    "DROP TRIGGER trg_invoice_lines_immutable ON invoice_lines",
    """CREATE TRIGGER trg_invoice_lines_immutable BEFORE INSERT OR UPDATE OR DELETE
       ON invoice_lines FOR EACH ROW EXECUTE FUNCTION hostmeter_invoice_child_immutable()""",
    """CREATE TRIGGER trg_invoice_adjustments_immutable BEFORE INSERT OR UPDATE OR DELETE
       ON invoice_adjustments FOR EACH ROW EXECUTE FUNCTION hostmeter_invoice_child_immutable()""",
    f"""CREATE FUNCTION hostmeter_invoices_no_truncate() RETURNS trigger AS $$
       BEGIN
         IF EXISTS (SELECT 1 FROM invoices WHERE status IN {_SEALED}) THEN
           RAISE EXCEPTION 'cannot truncate %: final or void invoices exist', TG_TABLE_NAME
             USING ERRCODE = 'integrity_constraint_violation';
         END IF;
         RETURN NULL;
       END $$ LANGUAGE plpgsql""",
    """CREATE TRIGGER trg_invoices_no_truncate BEFORE TRUNCATE ON invoices
       FOR EACH STATEMENT EXECUTE FUNCTION hostmeter_invoices_no_truncate()""",
    """CREATE TRIGGER trg_invoice_lines_no_truncate BEFORE TRUNCATE ON invoice_lines
       FOR EACH STATEMENT EXECUTE FUNCTION hostmeter_invoices_no_truncate()""",
    """CREATE TRIGGER trg_invoice_adjustments_no_truncate BEFORE TRUNCATE ON invoice_adjustments
       FOR EACH STATEMENT EXECUTE FUNCTION hostmeter_invoices_no_truncate()""",
]
_PG_DROP = [
    "DROP TRIGGER IF EXISTS trg_invoice_adjustments_no_truncate ON invoice_adjustments",
    "DROP TRIGGER IF EXISTS trg_invoice_lines_no_truncate ON invoice_lines",
    "DROP TRIGGER IF EXISTS trg_invoices_no_truncate ON invoices",
    "DROP FUNCTION IF EXISTS hostmeter_invoices_no_truncate()",
    "DROP TRIGGER IF EXISTS trg_invoice_adjustments_immutable ON invoice_adjustments",
    "DROP TRIGGER IF EXISTS trg_invoice_lines_immutable ON invoice_lines",
    """CREATE TRIGGER trg_invoice_lines_immutable BEFORE INSERT OR UPDATE OR DELETE
       ON invoice_lines FOR EACH ROW EXECUTE FUNCTION hostmeter_invoice_line_immutable()""",
    "DROP FUNCTION IF EXISTS hostmeter_invoice_child_immutable()",
]


def _run(statements: list[str]) -> None:
    for statement in statements:
        op.execute(statement)


def upgrade() -> None:
    _run(_PG if op.get_bind().dialect.name == "postgresql" else _SQLITE)


def downgrade() -> None:
    _run(_PG_DROP if op.get_bind().dialect.name == "postgresql" else _SQLITE_DROP)
