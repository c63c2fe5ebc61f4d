"""Airflow DAG of the demo campaign: tiny GPT cells on CPU (include/campaigns/demo.yaml)."""

from charllm.orchestrate.factory import campaign_dag

dag = campaign_dag("demo.yaml")
