"""Airflow DAG of the CharLLM-PPT small proxy campaign on one GPU (include/campaigns/charllm-small-1gpu.yaml)."""

from charllm.orchestrate.factory import campaign_dag

dag = campaign_dag("charllm-small-1gpu.yaml")
