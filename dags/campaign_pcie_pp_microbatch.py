"""Airflow DAG of the PCIe study's pipeline micro-batch side quest (include/campaigns/pcie-pp-microbatch.yaml)."""

from charllm.orchestrate.factory import campaign_dag

dag = campaign_dag("pcie-pp-microbatch.yaml")
