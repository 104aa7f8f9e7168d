"""boto3 sessions for ``fluidity cloud`` and errors a person can act on.

Region, profile and endpoint come from the flags (``--region``, ``--profile``,
``--endpoint-url``) or, unset, from the usual AWS environment (``AWS_REGION`` /
``AWS_DEFAULT_REGION``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, ``~/.aws/config``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fluidity.errors import ConfigError, FluidityError

AWS_EXTRA_HINT = "install the AWS tools with `pip install 'fluidity[aws]'`"
_CONNECT_TIMEOUT = 10  # seconds to open a connection to an AWS endpoint
_READ_TIMEOUT = 30  # seconds to wait for an answer


class AwsError(FluidityError):
    """An AWS call failed; the message names the call and what to do."""


def _boto3() -> Any:
    try:
        import boto3
    except ImportError:
        raise ConfigError(f"`fluidity cloud` needs boto3: {AWS_EXTRA_HINT}") from None
    return boto3


@dataclass(frozen=True)
class AwsTarget:
    """Where AWS calls go: ``None`` fields fall back to the AWS environment."""

    region: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None

    def session(self) -> Any:
        """A boto3 session for the profile and region (raises AwsError for an unknown profile)."""
        boto3 = _boto3()
        from botocore.exceptions import ProfileNotFound

        try:
            # boto3 reads AWS_DEFAULT_REGION; AWS_REGION (what Lambda, ECS and many CI systems
            # set) is honoured here as well.
            region = self.region or os.environ.get("AWS_REGION") or None
            session = boto3.session.Session(profile_name=self.profile, region_name=region)
            return session
        except ProfileNotFound:
            raise AwsError(
                f"AWS profile {self.profile!r} not found: check ~/.aws/config or --profile"
            ) from None

    def client(self, service: str) -> Any:
        """A boto3 client for ``service`` with short timeouts and the endpoint override."""
        from botocore.config import Config

        session = self.session()
        if not session.region_name:
            raise AwsError(
                "no AWS region: pass --region or set AWS_REGION (or run `aws configure`)"
            )
        config = Config(connect_timeout=_CONNECT_TIMEOUT, read_timeout=_READ_TIMEOUT)
        kwargs: dict[str, Any] = {"config": config}
        if self.endpoint_url:
            kwargs["endpoint_url"] = self.endpoint_url
        return session.client(service, **kwargs)

    @property
    def region_name(self) -> str:
        """The region calls go to (flag, environment or profile)."""
        return str(self.session().region_name or "")


@contextmanager
def aws_errors(doing: str) -> Iterator[None]:
    """Turn botocore errors raised inside into :class:`AwsError` saying what was being done."""
    _boto3()
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
    )

    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code, message = error.get("Code", "Error"), error.get("Message", "")
        hint = ""
        if code in ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation"):
            hint = " (your AWS identity lacks this permission: see docs/fargate.md, Prerequisites)"
        elif code in ("ExpiredToken", "ExpiredTokenException", "InvalidClientTokenId"):
            hint = " (refresh your AWS credentials, e.g. `aws sso login`)"
        raise AwsError(f"{doing}: {code}: {message}{hint}") from None
    except NoCredentialsError:
        raise AwsError(
            f"{doing}: no AWS credentials: run `aws configure`, set AWS_PROFILE or pass --profile"
        ) from None
    except NoRegionError:
        raise AwsError(f"{doing}: no AWS region: pass --region or set AWS_REGION") from None
    except EndpointConnectionError as exc:
        raise AwsError(f"{doing}: cannot reach {exc.kwargs.get('endpoint_url')}") from None
    except BotoCoreError as exc:
        raise AwsError(f"{doing}: {exc}") from None
