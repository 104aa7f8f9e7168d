"""The moto fixtures other suites rely on: a Fargate-like service whose tasks get public IPs."""

from __future__ import annotations

from tests.awsfixtures import EcsScheduler, aws_client, create_fargate_service


def test_scheduler_runs_tasks_with_public_ip_and_stops_them(moto_endpoint: str) -> None:
    svc = create_fargate_service(moto_endpoint)
    ecs = aws_client("ecs", moto_endpoint)
    ec2 = aws_client("ec2", moto_endpoint)
    scheduler = EcsScheduler(moto_endpoint, svc, public_ip="127.0.0.1")
    assert scheduler.reconcile() == []
    ecs.update_service(cluster=svc.cluster, service=svc.service, desiredCount=1)
    [arn] = scheduler.reconcile()
    task = ecs.describe_tasks(cluster=svc.cluster, tasks=[arn])["tasks"][0]
    assert task["group"] == f"service:{svc.service}"
    eni = next(
        d["value"] for d in task["attachments"][0]["details"] if d["name"] == "networkInterfaceId"
    )
    interface = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni])["NetworkInterfaces"][0]
    assert interface["Association"]["PublicIp"] == "127.0.0.1"
    ecs.update_service(cluster=svc.cluster, service=svc.service, desiredCount=0)
    assert scheduler.reconcile() == []
    assert scheduler.public_ips == {}
    stopped = ecs.describe_tasks(cluster=svc.cluster, tasks=[arn])["tasks"][0]
    assert stopped["lastStatus"] == "STOPPED"
