"""The session view: an Airflow 3 plugin page over the ledger (read-only, plus "end session").

``queries`` aggregates the ledger in SQL (no Airflow), ``plots`` draws SVG, ``thumbnails`` makes
the micrograph / power-spectrum / picks previews once and caches them under the session's
``processed/thumbnails``, ``page`` renders HTML, and ``app`` is the FastAPI app that the plugin
(``plugins/cryoflow_view_plugin.py``) mounts in Airflow's API server behind Airflow's own
authentication and authorisation.

Every module here imports its siblings absolutely (``cryoflow.view.x``): Airflow's plugins
manager also executes each ``.py`` file under ``plugins/`` as a top-level module.
"""
