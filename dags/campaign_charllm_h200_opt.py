"""Airflow DAG of the CharLLM-PPT H200 optimisation sweep (Figs 8, 5, 17) (include/campaigns/charllm-h200-opt.yaml)."""

from charllm.orchestrate.factory import campaign_dag

dag = campaign_dag("charllm-h200-opt.yaml")
