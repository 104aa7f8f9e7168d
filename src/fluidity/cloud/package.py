"""The Lambda deployment zip: the handler module and exactly the project modules it imports.

The handlers (:data:`HANDLER_MODULE`) import only the standard library and boto3, which the
Lambda Python runtime provides, so the zip holds a few dozen KiB of pure Python and works on
any architecture. :func:`handler_modules` walks the import graph statically
(:mod:`modulefinder`, which also sees imports inside functions) and refuses any third-party
module other than those the runtime ships. The zip is byte-for-byte reproducible (fixed
timestamps and order), so its SHA-256 names the S3 key and CloudFormation updates the functions
only when the code changed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import modulefinder
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluidity.cloud.aws import AwsTarget, aws_errors
from fluidity.errors import ConfigError

HANDLER_MODULE = "fluidity.control.lambdas"
"""Module holding ``wake_handler``, ``sleep_handler``, ``kill_handler`` and ``status_handler``."""
RUNTIME_PROVIDED = frozenset(
    {"boto3", "botocore", "s3transfer", "jmespath", "dateutil", "urllib3", "six"}
)
"""Top-level packages the AWS Lambda Python runtime already has (boto3 and its dependencies)."""
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same code gives the same bytes


@dataclass(frozen=True)
class LambdaPackage:
    """A built zip: its bytes, their SHA-256, and the archive paths it holds."""

    data: bytes
    sha256: str
    files: tuple[str, ...]

    @property
    def default_key(self) -> str:
        """``fluidity/lambda-<first 16 hex of the SHA-256>.zip``."""
        return f"fluidity/lambda-{self.sha256[:16]}.zip"


def handler_modules(module: str = HANDLER_MODULE) -> dict[str, Path]:
    """``module name -> source file`` of every project module the handler module imports.

    Raises :class:`ConfigError` if it imports a third-party package the Lambda runtime lacks.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ConfigError(f"cannot find the Lambda handler module {module}")
    finder = modulefinder.ModuleFinder(excludes=sorted(RUNTIME_PROVIDED))
    finder.run_script(spec.origin)
    project: dict[str, Path] = {}
    foreign: list[str] = []
    installed = {
        Path(p).resolve() for p in (sysconfig.get_path("purelib"), sysconfig.get_path("platlib"))
    }
    for name, found in finder.modules.items():
        top = name.split(".")[0]
        source: str | None = getattr(found, "__file__", None)  # modulefinder.Module, untyped
        if top == "fluidity":
            if source:
                project[name] = Path(source)
        elif source and any(Path(source).resolve().is_relative_to(place) for place in installed):
            foreign.append(name)  # a third-party package (stdlib modules live elsewhere)
    # Names that could not be imported, when a project module asked for them: a missing project
    # module or an uninstalled package would fail at import time in Lambda.
    for name, importers in finder.badmodules.items():
        asked_by_us = any(i == "__main__" or i.startswith("fluidity") for i in importers)
        if asked_by_us and name.split(".")[0] not in RUNTIME_PROVIDED:
            foreign.append(name)
    project[module] = Path(spec.origin)
    for name in list(project):  # the packages on the way down: fluidity, fluidity.control, ...
        parts = name.split(".")
        for depth in range(1, len(parts)):
            package = ".".join(parts[:depth])
            if package not in project:
                package_spec = importlib.util.find_spec(package)
                if package_spec is not None and package_spec.origin:
                    project[package] = Path(package_spec.origin)
    outside = sorted({name.split(".")[0] for name in foreign} - RUNTIME_PROVIDED)
    if outside:
        raise ConfigError(
            f"the Lambda handlers import {', '.join(outside)}, which the Lambda runtime does not "
            "provide: keep fluidity.control's Lambda path to the standard library and boto3"
        )
    return project


def build_package(module: str = HANDLER_MODULE) -> LambdaPackage:
    """Build the zip in memory: ``fluidity/...`` paths as in the source tree."""
    modules = handler_modules(module)
    root = _package_root()
    entries: dict[str, bytes] = {}
    for path in modules.values():
        archive_name = path.resolve().relative_to(root).as_posix()
        entries[archive_name] = path.read_bytes()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, entries[name])
    data = buffer.getvalue()
    return LambdaPackage(data, hashlib.sha256(data).hexdigest(), tuple(sorted(entries)))


def upload_package(target: AwsTarget, package: LambdaPackage, bucket: str, key: str) -> None:
    """Put the zip at ``s3://bucket/key``, creating a private bucket if it does not exist."""
    s3 = target.client("s3")
    ensure_bucket(s3, bucket, target.region_name)
    with aws_errors(f"uploading the Lambda package to s3://{bucket}/{key}"):
        s3.put_object(Bucket=bucket, Key=key, Body=package.data, ContentType="application/zip")


def ensure_bucket(s3: Any, bucket: str, region: str) -> None:
    """Create ``bucket`` (all public access blocked) unless it exists and is ours."""
    from botocore.exceptions import ClientError

    try:
        s3.head_bucket(Bucket=bucket)
        return
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code not in ("404", "NoSuchBucket", "NotFound"):
            with aws_errors(f"checking bucket {bucket}"):
                raise
    with aws_errors(f"creating bucket {bucket}"):
        if region and region != "us-east-1":
            s3.create_bucket(
                Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region}
            )
        else:
            s3.create_bucket(Bucket=bucket)
        s3.put_public_access_block(
            Bucket=bucket,
            PublicAccessBlockConfiguration={
                "BlockPublicAcls": True,
                "IgnorePublicAcls": True,
                "BlockPublicPolicy": True,
                "RestrictPublicBuckets": True,
            },
        )


def _package_root() -> Path:
    """The directory holding the ``fluidity`` package (``src/`` in a checkout)."""
    import fluidity

    return Path(fluidity.__file__).resolve().parent.parent
