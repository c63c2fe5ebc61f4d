"""Airflow DAG of the Megatron-Kwai rematerialisation campaign on two GPUs (include/campaigns/kwai-remat-2gpu.yaml)."""

from charllm.orchestrate.factory import campaign_dag

dag = campaign_dag("kwai-remat-2gpu.yaml")
