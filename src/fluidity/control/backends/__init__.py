"""Control-plane backends: ``ecs`` (boto3: ECS, EC2, CloudWatch) and ``local`` (a process)."""
