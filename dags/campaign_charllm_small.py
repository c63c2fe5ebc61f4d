"""Airflow DAG of the CharLLM-PPT small proxy campaign on 1-2 GPUs (include/campaigns/charllm-small.yaml)."""

from charllm.orchestrate.factory import campaign_dag

dag = campaign_dag("charllm-small.yaml")
