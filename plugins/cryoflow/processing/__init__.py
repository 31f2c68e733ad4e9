"""Processing: what each movie owes (the step graph), the tools' command lines and outputs, the
compute backends (Slurm over SSH, local) and the built-in engines. Starts from the ledger's
verified movies. Nothing imported here: the engines run on compute nodes without Airflow."""
