"""Airflow DAG of the Perseus PP2 stage profile on one two-GPU machine (include/campaigns/perseus-pp2-local.yaml)."""

from charllm.orchestrate.factory import campaign_dag

dag = campaign_dag("perseus-pp2-local.yaml")
