"""The ledger's revisions (Alembic loads them by file, not by import)."""
