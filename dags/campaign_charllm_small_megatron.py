"""Airflow DAG of the two-GPU small campaign through megatron-core (include/campaigns/charllm-small-megatron.yaml)."""

from charllm.orchestrate.factory import campaign_dag

dag = campaign_dag("charllm-small-megatron.yaml")
