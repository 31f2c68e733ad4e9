-- Run once by the postgres image when its data volume is first initialised (a Swarm config of
-- the stack, mounted into /docker-entrypoint-initdb.d). POSTGRES_DB=airflow (Airflow's metadata)
-- exists by then, owned by POSTGRES_USER=cryoflow; this adds the session ledger's database.
-- The ledger's tables are made by its migrations (python -m cryoflow.ledger.schema upgrade,
-- run by the airflow-migrate job).
CREATE DATABASE cryoflow OWNER cryoflow;
