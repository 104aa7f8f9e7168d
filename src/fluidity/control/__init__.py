"""The control plane: wake, sleep, kill, release and status of the server, on AWS and at home.

:mod:`~fluidity.control.core` holds the decisions (pure, clock injected) and the
:class:`~fluidity.control.core.Backend` protocol; ``backends/`` drives ECS + CloudWatch or a local
``fluidity server`` process; :mod:`~fluidity.control.lambdas` and :mod:`~fluidity.control.api` are
thin adapters of HTTP requests and scheduled events onto the core. Everything the Lambda handlers
import (``core``, ``operations``, ``backends.ecs``, ``lambdas``) is standard library plus boto3.
"""
