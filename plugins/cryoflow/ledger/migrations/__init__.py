"""Alembic migrations of the session ledger (see :mod:`cryoflow.ledger.schema`, which runs them).

``versions/`` holds one revision per schema change, oldest first: ``0001`` is the ledger as
``create_all`` made it at commit 54d6be7, the last schema before migrations existed.
"""
