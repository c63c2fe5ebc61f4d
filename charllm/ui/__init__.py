"""The campaign view of the Airflow UI, without Airflow: what the plugin in ``plugins/`` shows.

:mod:`charllm.ui.data` reads the results catalog, the tables and the figures folders and
builds the campaign matrix; :mod:`charllm.ui.render` turns it into HTML. Nothing here takes
a path or SQL from a request: names (campaigns, figure runs, figure files, attempt files)
are looked up in what exists and refused otherwise.
"""
