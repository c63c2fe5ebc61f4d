"""The Airflow layer: DAG factory, the deferrable job sensor and its trigger.

Only this package imports Airflow; it turns charllm's errors into task outcomes.
"""
