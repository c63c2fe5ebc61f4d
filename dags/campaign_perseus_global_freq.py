"""Airflow DAG of the Perseus study (include/campaigns/perseus-global-freq.yaml)."""

from charllm.orchestrate.factory import campaign_dag

dag = campaign_dag("perseus-global-freq.yaml")
