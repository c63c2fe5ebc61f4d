"""Airflow DAG of the CharLLM-PPT H100 optimisation sweep (include/campaigns/charllm-h100-opt.yaml)."""

from charllm.orchestrate.factory import campaign_dag

dag = campaign_dag("charllm-h100-opt.yaml")
