"""Airflow DAG of the demo campaign on Slurm over SSH (include/campaigns/demo_slurm.yaml)."""

from charllm.orchestrate.factory import campaign_dag

dag = campaign_dag("demo_slurm.yaml")
