"""Airflow DAG of the demo campaign on a prepared corpus: tiny GPT cells on CPU reading an
indexed dataset built by the dataset stage (include/campaigns/demo_indexed.yaml)."""

from charllm.orchestrate.factory import campaign_dag

dag = campaign_dag("demo_indexed.yaml")
