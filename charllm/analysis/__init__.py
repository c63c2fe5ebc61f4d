"""Aggregation and figures (pandas, matplotlib). Never imported by DAG files at parse time."""
