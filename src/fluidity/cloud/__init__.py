"""Deploying and operating Fluidity on AWS: the helpers behind ``fluidity cloud`` and the scripts.

``aws`` (boto3 sessions and readable errors), ``stacks`` (CloudFormation deploy and destroy with
streamed events), ``package`` (the Lambda zip), ``service`` (start, stop, status of the ECS
service through the control plane's ECS backend), ``cost`` (the month's estimate), ``logs``
(tailing CloudWatch Logs) and ``secrets`` (``certs push``). boto3 only; needs the ``aws`` extra.
"""
