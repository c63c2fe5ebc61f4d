"""Airflow DAG of the PCIe strategies study (DDP/TP/PP/ZeRO x 1/2/4 GPUs x interconnect) (include/campaigns/pcie-strategies.yaml)."""

from charllm.orchestrate.factory import campaign_dag

dag = campaign_dag("pcie-strategies.yaml")
