"""Airflow DAG of the Megatron-Kwai Figure 9 rows on the 64-GPU H100 cluster (include/campaigns/kwai-fig9-h100.yaml)."""

from charllm.orchestrate.factory import campaign_dag

dag = campaign_dag("kwai-fig9-h100.yaml")
