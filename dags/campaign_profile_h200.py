"""Airflow DAG of the layer-profile campaign on one H200 (include/campaigns/profile-h200.yaml)."""

from charllm.orchestrate.factory import campaign_dag

dag = campaign_dag("profile-h200.yaml")
