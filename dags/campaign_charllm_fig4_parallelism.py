"""Airflow DAG of the CharLLM-PPT parallelism sweep (Fig 4; the 01000 subset of the H200 optimisation sweep) (include/campaigns/charllm-fig4-parallelism.yaml)."""

from charllm.orchestrate.factory import campaign_dag

dag = campaign_dag("charllm-fig4-parallelism.yaml")
