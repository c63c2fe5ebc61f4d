"""Setting a cluster up for a campaign: the training environment and the tokenized dataset.

``jobs`` finds, submits, waits for and judges the two setup jobs (environment, dataset);
``dataprep`` is what the dataset job runs (``python -m charllm.setup.dataprep``). Nothing
here is imported when the package is: ``dataprep`` runs on the cluster with numpy only.
"""
