"""Airflow DAG of the Megatron-Kwai rematerialisation campaign on one H200 (include/campaigns/kwai-remat-1gpu.yaml)."""

from charllm.orchestrate.factory import campaign_dag

dag = campaign_dag("kwai-remat-1gpu.yaml")
