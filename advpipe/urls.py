"""Store locations: a local path or an fsspec URL, the storage options to open it, and redaction for display.

    s3://bucket/stores/digits        any S3-compatible endpoint (AWS, MinIO, Ceph) through s3fs
    gs://bucket/stores/digits        Google Cloud Storage, when gcsfs is installed
    az://container/stores/digits     Azure Blob Storage, when adlfs is installed
    https://host/stores/digits       read-only
    runs/digits/store                a local directory (or file:///abs/path)

Credentials come only from each protocol's standard mechanisms (environment variables,
config files, profiles, instance roles); the endpoint of an S3-compatible service comes from
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` or from the config key `store.endpoint_url`.
Options that carry secrets are refused (`check_options`), so no credential can reach a config
file, a manifest or a log through advpipe. Anything that shows a location goes through
`redact`, which hides `user:password@` and signed-URL query parameters.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from advpipe.errors import ConfigError, StoreError

#: Protocols that can be read but never written by advpipe.
READ_ONLY_PROTOCOLS = frozenset({"http", "https"})
LOCAL_PROTOCOLS = frozenset({"file", "local"})
#: storage option keys that hold secrets: they belong in the environment or the provider's config files.
SECRET_OPTION = re.compile(r"(^|_)(key|secret|token|password|passwd|credentials?|sas|signature|sig)$", re.I)
ALLOWED_OPTIONS = frozenset({"profile", "anon", "requester_pays", "endpoint_url", "client_kwargs", "config_kwargs",
                             "default_block_size", "default_fill_cache", "version_aware", "use_ssl", "project",
                             "account_name", "region_name", "skip_instance_cache", "use_listings_cache"})
REDACTED = "***"
_USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<userinfo>[^/?#@\s'\"]+)@", re.I)
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential|"
    r"signature|awsaccesskeyid|sig|token|access_token|secret|password|key|api_key|apikey)=)[^&#\s'\"]+", re.I)
_AUTH_HEADER = re.compile(r"(?P<key>\b(?:Credential|Signature|X-Amz-Security-Token)[=:]\s*)[^,\s'\"&]+", re.I)


def protocol(location: str | os.PathLike) -> str:
    """The location's fsspec protocol ('file' for a plain path)."""
    text = os.fspath(location)
    match = re.match(r"^([a-z][a-z0-9+.-]*)://", text, re.I)
    if match is None:
        return "file"
    name = match.group(1).lower()
    return "s3" if name in ("s3a", "s3n") else name


def is_remote(location: str | os.PathLike) -> bool:
    return protocol(location) not in LOCAL_PROTOCOLS


def is_read_only(location: str | os.PathLike) -> bool:
    """True for locations advpipe never writes to (http(s):// has no portable write)."""
    return protocol(location) in READ_ONLY_PROTOCOLS


def redact(text: Any) -> str:
    """`text` with the secrets of any URL in it hidden: `user:pass@`, signed-URL parameters, request signatures."""
    shown = _USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", str(text))
    shown = _QUERY_SECRET.sub(lambda m: f"{m.group('key')}{REDACTED}", shown)
    return _AUTH_HEADER.sub(lambda m: f"{m.group('key')}{REDACTED}", shown)


def check_options(options: Mapping[str, Any] | None, origin: str = "storage_options") -> dict[str, Any]:
    """The options as a dict; refused (ConfigError) when one holds a secret.

    Keys, secrets, tokens and passwords come from the environment, the provider's config
    files or a named profile, never from advpipe's options: options are recorded and shown.
    """
    options = dict(options or {})
    for key in options:
        if SECRET_OPTION.search(str(key)) and key not in ALLOWED_OPTIONS:
            raise ConfigError(
                f"{origin + ': ' if origin else ''}'{key}' looks like a credential; advpipe never takes credentials as "
                "options (they would end up in configs and logs). Use the provider's standard mechanism instead: "
                "environment variables (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, "
                "AZURE_STORAGE_*), its config files, or a named profile (storage option 'profile')")
    return options


def storage_options(location: str | os.PathLike, options: Mapping[str, Any] | None = None,
                    endpoint_url: str | None = None) -> dict[str, Any]:
    """The fsspec options to open `location` with: `options`, plus the S3 endpoint when one is set.

    The endpoint is, in order: `options['endpoint_url']`, `endpoint_url` (the config key
    `store.endpoint_url`), `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`; none means AWS itself.
    """
    merged = check_options(options)
    if protocol(location) == "s3" and "endpoint_url" not in merged:
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            merged["endpoint_url"] = endpoint
    return merged


def config_storage_options(location: str | os.PathLike, store_config: Any) -> dict[str, Any]:
    """The fsspec options for a store named in a config: its `store.storage_options` and `store.endpoint_url`."""
    return storage_options(location, store_config.storage_options, store_config.endpoint_url)


def filesystem(location: str | os.PathLike, options: Mapping[str, Any] | None = None):
    """(fsspec filesystem, root path within it) for a location; a clear error when its package is missing."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(os.fspath(location), **storage_options(location, options))
    except ImportError as exc:
        raise StoreError(f"{redact(location)}: the '{protocol(location)}://' protocol needs a package that is not "
                         f"installed ({exc}); install it (s3fs for s3://, gcsfs for gs://, adlfs for az://)") from None
    except ValueError as exc:
        if "Protocol not known" in str(exc):
            raise StoreError(f"{redact(location)}: unknown protocol '{protocol(location)}://'") from None
        raise StoreError(f"{redact(location)}: not a valid location ({redact(exc)})") from None
    return fs, root


class RedactingFilter(logging.Filter):
    """A logging filter that redacts URL credentials in every record a handler emits."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        shown = redact(message)
        if shown != message:
            record.msg, record.args = shown, None
        return True
