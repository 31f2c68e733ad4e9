"""The ledger: the one durable record of sessions, files and what each movie still owes
(``store``), its schema and Alembic migrations (``schema``, ``migrations/``)."""
