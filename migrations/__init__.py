"""Alembic environment and revisions for hostmeter (SQLite and PostgreSQL)."""
