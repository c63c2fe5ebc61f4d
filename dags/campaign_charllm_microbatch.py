"""Airflow DAG of the CharLLM-PPT micro-batch sweep (Figs 13, 15) (include/campaigns/charllm-microbatch.yaml)."""

from charllm.orchestrate.factory import campaign_dag

dag = campaign_dag("charllm-microbatch.yaml")
