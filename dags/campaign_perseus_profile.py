"""Airflow DAG of the Perseus study (include/campaigns/perseus-profile.yaml)."""

from charllm.orchestrate.factory import campaign_dag

dag = campaign_dag("perseus-profile.yaml")
