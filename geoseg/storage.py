"""Locations: a local path or a URL, and the one place that reads, writes and lists them.

    /data/run, run              local paths (through the OS: atomic renames, memory maps)
    s3://bucket/prefix          Amazon S3 and S3-compatible stores (MinIO, Ceph, ...)
    gs://bucket/prefix          Google Cloud Storage
    az://container/prefix       Azure Blob Storage (also abfs://, abfss://)
    http(s)://host/path         read-only

URLs go through obstore (the Rust object_store crate): on the loopback S3 server it put and
got small objects 3x faster than s3fs, large ones as fast (benchmarks/README.md), and it
writes an object only if absent (``create``), which the run's lease needs. Credentials and
endpoints come from the cloud tools' own environment variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``,
``AZURE_STORAGE_ACCOUNT_NAME``/``AZURE_STORAGE_ACCOUNT_KEY``, ...), read by obstore and by GDAL;
:func:`gdal_settings` translates what GDAL does not take as is: ``AWS_ENDPOINT_URL``,
``GOOGLE_BASE_URL`` (another endpoint for GCS's XML API) and ``GOOGLE_SKIP_SIGNATURE``,
``AZURE_STORAGE_ENDPOINT`` and ``AZURE_STORAGE_USE_EMULATOR``/``AZURITE_BLOB_STORAGE_URL``
(Azurite). On GCS, obstore also takes a static OAuth token (``GOOGLE_BEARER_TOKEN``); GDAL has
no option for one on /vsigs/, so its reads then need GDAL's own GCS credentials (or
``GS_NO_SIGN_REQUEST=YES`` for public objects). obstore 0.12 still asks the VM's metadata server
for a token under ``GOOGLE_SKIP_SIGNATURE`` alone: give it a token or a service account.

On an object store, an object is written whole or not at all; where a local writer renames a
finished file into place, the remote one writes the object that commits a result last.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob as local_glob
import hashlib
import io
import os
import posixpath
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

# URL scheme -> GDAL virtual file system prefix
GDAL_PREFIX = {
    "s3": "/vsis3/",
    "gs": "/vsigs/",
    "gcs": "/vsigs/",
    "az": "/vsiaz/",
    "azure": "/vsiaz/",
    "abfs": "/vsiadls/",
    "abfss": "/vsiadls/",
    "http": "/vsicurl/",
    "https": "/vsicurl/",
}
READ_ONLY = frozenset({"http", "https"})
AZURE_SCHEMES = frozenset({"az", "azure", "abfs", "abfss"})
GCS_SCHEMES = frozenset({"gs", "gcs"})
HTTP_REASONS = {401: "access denied", 403: "access denied", 404: "no such object"}  # what GDAL's statuses say
SECRET_VARIABLES = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_CLIENT_SECRET",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "GOOGLE_BEARER_TOKEN",
    "GS_SECRET_ACCESS_KEY",
    "GS_OAUTH2_REFRESH_TOKEN",
    "GS_OAUTH2_CLIENT_SECRET",
    "GS_OAUTH2_PRIVATE_KEY",
)


class StorageError(OSError):
    """A location that cannot be read or written; the message names it and the reason."""

    def __init__(self, message: str, loc: str = "", reason: str = "", lasting: bool = True) -> None:
        super().__init__(message)
        self.loc, self.reason = loc, reason or message
        # whether asking again would give the same answer (no such object, access denied), unlike
        # an endpoint that did not answer or a server error
        self.lasting = lasting

    def __str__(self) -> str:
        return self.args[0]


def scheme(loc: str) -> str:
    """The URL scheme of ``loc`` ('' for a local path; a Windows drive letter is no scheme)."""
    head, sep, _ = str(loc).partition("://")
    return head.lower() if sep and len(head) > 1 else ""


def is_url(loc: str | Path) -> bool:
    return scheme(str(loc)) in GDAL_PREFIX


def absolute(loc: str | Path) -> str:
    """A location that means the same from any working directory: URLs as given (no trailing
    slash), local paths resolved."""
    text = str(loc)
    if is_url(text):
        return text.rstrip("/")
    if scheme(text):
        raise StorageError(f"{text}: unsupported URL scheme {scheme(text)!r} (use s3, gs, az, abfs, http or https)")
    return str(Path(text).expanduser().resolve())


def join(loc: str | Path, *parts: str) -> str:
    text = str(loc)
    if is_url(text):
        return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(text, *parts))


def without_query(loc: str) -> str:
    """An http(s) URL without its query and fragment: the path of the object, for its name."""
    return loc.split("?", 1)[0].split("#", 1)[0] if scheme(loc) in READ_ONLY else loc


# The query parameters that sign a URL or carry a credential (S3, GCS, Azure SAS, CloudFront,
# API keys and tokens): they change when the URL is signed again, and name nothing about the object.
SIGNING_PARAMETERS = frozenset(
    {"se", "sp", "sv", "st", "spr", "sr", "skoid", "sktid", "skt", "ske", "sks", "skv", "key-pair-id", "policy",
     "awsaccesskeyid", "code"}
)  # fmt: skip
# a parameter's name that says it holds a secret: sig, X-Amz-Signature, access_token, api_key...
CREDENTIAL_NAME = r"(?:[\w-]*[_-])?(?:sig|signature|token|secret|key|apikey|password|credential)"
CREDENTIAL_PARAMETER = re.compile(rf"(?i){CREDENTIAL_NAME}|(?:[\w-]*[_-])?expires?")


def unsigned(loc: str) -> str:
    """An http(s) URL without its credentials: the parameters that sign it or carry a key or a
    token, and a ``user:password@`` (others, such as ``versionId``, and a ``#fragment`` stay).
    The same for every signing of one object, different for two objects."""
    if scheme(loc) not in READ_ONLY:
        return loc
    parts = urlsplit(loc)
    kept = [
        (key, value)
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
        if key.lower() not in SIGNING_PARAMETERS
        and not key.lower().startswith(("x-amz-", "x-goog-"))
        and not CREDENTIAL_PARAMETER.fullmatch(key)
    ]
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1], query=urlencode(kept)))


def record_name(loc: str) -> str:
    """How a run's stored records name a location: as :func:`redact` shows it, with a digest of
    :func:`unsigned` where a query was masked (stable when signed again, distinct per object)."""
    shown = redact(loc)
    if shown == loc:
        return loc
    return f"{shown} ({hashlib.sha256(unsigned(loc).encode()).hexdigest()[:12]})"


def name(loc: str) -> str:
    return without_query(loc).rstrip("/").rsplit("/", 1)[-1] if is_url(loc) else Path(loc).name


def is_within(loc: str, folder: str) -> bool:
    """Whether ``loc`` is ``folder`` or lies under it (both absolute, as :func:`absolute` gives them)."""
    if is_url(loc) != is_url(folder):
        return False
    if is_url(loc):
        loc, folder = loc.rstrip("/"), folder.rstrip("/")
        return loc == folder or loc.startswith(folder + "/")
    return Path(loc).resolve().is_relative_to(Path(folder).resolve())


def parent(loc: str) -> str:
    return loc.rstrip("/").rsplit("/", 1)[0] if is_url(loc) else str(Path(loc).parent)


def resolve_href(base: str, href: str) -> str:
    """``href`` (from a STAC item at ``base``) as a location: absolute hrefs as they are,
    relative ones against the item's own location."""
    if is_url(href):
        return href
    href = href.removeprefix("file://")
    if not is_url(base):
        return href if href.startswith("/") else str((Path(base).parent / href).resolve())
    root, key = _root_and_key(base)
    # An href from "/" starts at the bucket or host; a relative one at the item's folder (by hand:
    # urljoin resolves the http schemes only).
    relative = posixpath.normpath(posixpath.join(posixpath.dirname("/" + key), href))
    return f"{root}{href if href.startswith('/') else relative}"


def redact(text: str) -> str:
    """``text`` without secrets: the values of the credential variables, and URL query strings
    (signed URLs carry their signature there)."""
    # a URL in GDAL's /vsicurl? name is percent-encoded: decoded, what it holds is found below
    text = re.sub(r"/vsicurl\?[^\s'\"]+", lambda found: unquote(found.group()), text)
    for variable in SECRET_VARIABLES:
        value = os.environ.get(variable)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    # up to a space or a quote, or the ": " that ends a location in an error line
    text = re.sub(r"(https?://[^\s?'\"]+)\?(?:[^\s'\":#]|:(?!\s|$))*", r"\1?***", text)
    # a signature's parameters wherever they are, e.g. a local copy named after a signed URL
    text = re.sub(rf"(?i)\b({CREDENTIAL_NAME})=(?:[^&\s'\":]|:(?!\s|$))+", r"\1=***", text)
    return re.sub(r"(\w+://)[^/\s@:]+:[^/\s@]+@", r"\1***@", text)  # user:password@host


# ---------------------------------------------------------------- object stores


AZURITE_ACCOUNT = "devstoreaccount1"  # the Azure Storage emulator's own account
# Azurite's documented, public development key (not a secret): the emulator accepts only it.
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _true(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


def _azure_emulator(env: Any) -> bool:
    return _true(env.get("AZURE_STORAGE_USE_EMULATOR"))


def _endpoint(kind: str, env: Any) -> str:
    """The custom endpoint the environment names for a store scheme ('' for the cloud's own)."""
    if kind == "s3":
        return env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or ""
    if kind in GCS_SCHEMES:
        return env.get("GOOGLE_BASE_URL") or ""
    if kind in AZURE_SCHEMES:
        if _azure_emulator(env):
            return env.get("AZURITE_BLOB_STORAGE_URL") or "http://127.0.0.1:10000"
        return env.get("AZURE_STORAGE_ENDPOINT") or env.get("AZURE_ENDPOINT") or ""
    return ""


def _client_options(kind: str) -> dict[str, Any]:
    # An endpoint that does not answer is reported within seconds, not after minutes of retries.
    options: dict[str, Any] = {"connect_timeout": "10s"}
    # obstore's own *_ALLOW_HTTP variables are not read once options are given: an emulator or an
    # S3-compatible server on plain http must be allowed here.
    if kind in READ_ONLY or _endpoint(kind, os.environ).startswith("http://"):
        options["allow_http"] = True
    return options


RETRIES = {"max_retries": 3, "retry_timeout": timedelta(seconds=60)}


@lru_cache(maxsize=64)
def _store(root: str):
    """The obstore store of a bucket or container (``s3://bucket``) or of an HTTP server."""
    from obstore.store import from_url

    kind = scheme(root)
    config = {}
    if kind in AZURE_SCHEMES and "@" not in root:
        # Named in the config, not only in the environment: obstore's Azure store cannot even
        # describe itself (in an error message) without it.
        account = os.environ.get("AZURE_STORAGE_ACCOUNT_NAME") or (
            AZURITE_ACCOUNT if _azure_emulator(os.environ) else None
        )
        if account:
            config["account_name"] = account
    return from_url(root, config=config or None, client_options=_client_options(kind), retry_config=RETRIES)


def _root_and_key(loc: str) -> tuple[str, str]:
    """``scheme://bucket`` (or host) and the key under it. An object key is taken as written: in
    it "#", "?" and "%" are characters (only an http(s) URL has a query and a fragment)."""
    if scheme(loc) in READ_ONLY:  # a URL's path is percent-encoded: the store encodes the key again
        parts = urlsplit(loc)
        return f"{parts.scheme}://{parts.netloc}", unquote(parts.path.lstrip("/"))
    kind, rest = loc.split("://", 1)
    bucket, _, key = rest.partition("/")
    return f"{kind}://{bucket}", key


def _split(loc: str) -> tuple[Any, str]:
    """The store holding ``loc`` and the key within it."""
    if scheme(loc) in READ_ONLY and urlsplit(loc).query:  # a signed URL: the store is the whole URL
        return _store(loc), ""
    root, key = _root_and_key(loc)
    return _store(root), key


def _not_found(exc: BaseException) -> bool:
    return isinstance(exc, FileNotFoundError) or type(exc).__name__ == "NotFoundError" or "404 Not Found" in str(exc)


def _remote_error(loc: str, exc: BaseException) -> StorageError:
    """One line naming the location and the reason, whatever obstore raised."""
    kind = type(exc).__name__
    text = str(exc)
    lasting = True
    if "NoSuchBucket" in text or "ContainerNotFound" in text:
        reason = "no such bucket"
    elif _not_found(exc):
        reason = "no such object"
    # the status with its phrase: a bare "403" can be in the URL's port (127.0.0.1:40321)
    elif kind in ("PermissionDeniedError", "UnauthenticatedError") or "403 Forbidden" in text or "AccessDenied" in text:
        reason = "access denied"
    elif "connect" in text.lower() or "dns" in text.lower():
        endpoint = _endpoint(scheme(loc), os.environ)  # which one: the environment may name another
        reason = f"endpoint unreachable ({endpoint})" if endpoint else "endpoint unreachable"
        lasting = False
    else:
        reason = text.strip().splitlines()[0] if text.strip() else kind
        lasting = False
    reason = redact(reason)
    return StorageError(f"{loc}: {reason}", loc, reason, lasting)


# what the stores' own error texts say, where GDAL passes them on without the status
STORE_REASONS = {
    "The specified key does not exist": "no such object",  # S3
    "The specified blob does not exist": "no such object",  # Azure
    "No such object": "no such object",  # Google Cloud Storage
    "The specified bucket does not exist": "no such bucket",
    "The specified container does not exist": "no such container",
    "Access Denied": "access denied",
    "not authorized to perform this operation": "access denied",  # Azure
}


def http_reason(message: str) -> str | None:
    """What the HTTP status (or the store's own text) in a GDAL message says of the object
    (GDAL reads with its own requests: its 403 on pixels can follow a HEAD that was allowed),
    or None."""
    found = re.search(r"HTTP response code: (\d{3})", message)
    if found and int(found.group(1)) in HTTP_REASONS:
        return HTTP_REASONS[int(found.group(1))]
    return next((reason for text, reason in STORE_REASONS.items() if text.lower() in message.lower()), None)


def gdal_reason(message: str) -> str:
    """A GDAL message without curl's note on a download it stopped itself (GDAL asks for a
    file's size by a GET it cuts short)."""
    return re.sub(r" - Failure writing output to destination, passed \d+ returned \d+", "", message)


def probe_writable(folder: str) -> None:
    """Create ``folder`` (a prefix on a store) and write and delete a small file in it: a job
    learns that it cannot write its outputs before its work, not after; ``StorageError`` if not."""
    probe = join(folder, f".write-test-{uuid.uuid4().hex[:8]}")
    try:
        make_dirs(folder)
        write_bytes(probe, b"")
        delete(probe)
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(f"{folder}: cannot write there ({exc.strerror or exc})") from None


def writable_output(loc: str | Path) -> str:
    """``loc`` made absolute, for a job to write its outputs under; ``StorageError`` where it
    cannot be (a read-only scheme, an unknown one)."""
    out = absolute(loc)
    _writable(out)
    return out


def _writable(loc: str) -> None:
    if scheme(loc) in READ_ONLY:
        raise StorageError(f"{loc}: {scheme(loc)} locations are read-only")


# ---------------------------------------------------------------- reading


def exists(loc: str) -> bool:
    if not is_url(loc):
        return Path(loc).exists()
    import obstore

    store, key = _split(loc)
    try:
        obstore.head(store, key)
        return True
    except Exception as exc:
        if _not_found(exc):  # not a bare "404": a key or a port may hold one
            return False
        error = _remote_error(loc, exc)
    if scheme(loc) in READ_ONLY:  # a signed URL signs its method: a GET may be allowed, a HEAD not
        with contextlib.suppress(StorageError):
            read_ranges(loc, [[0, 1]])
            return True
    raise error


def is_file(loc: str) -> bool:
    """Whether ``loc`` is there and no folder: a file, or on a store an object (not a prefix)."""
    if not is_url(loc):
        return Path(loc).exists() and not Path(loc).is_dir()
    if not _root_and_key(loc.rstrip("/"))[1]:
        return False
    try:
        return exists(loc.rstrip("/"))
    except StorageError as exc:
        # a policy that grants a prefix's objects only (runs/r1/*) refuses a HEAD of runs/r1
        # itself: no object of that name is readable, and writing is probed next
        if exc.reason == "access denied":
            return False
        raise


def is_dir(loc: str) -> bool:
    """A local folder, or a URL prefix with at least one object under it."""
    if not is_url(loc):
        return Path(loc).is_dir()
    return bool(list_files(loc.rstrip("/") + "/", limit=1))


def read_bytes(loc: str) -> bytes:
    return cast(bytes, _read(loc, missing_ok=False))


def read_if_exists(loc: str) -> bytes | None:
    """``loc``'s bytes, or None when there is no such file or object (one request, not two)."""
    return _read(loc, missing_ok=True)


def _read(loc: str, missing_ok: bool) -> bytes | None:
    if not is_url(loc):
        try:
            return Path(loc).read_bytes()
        except FileNotFoundError:
            if missing_ok:
                return None
            raise StorageError(f"{loc}: No such file or directory") from None
        except OSError as exc:  # on a network file system some pass (EIO, ESTALE, ETIMEDOUT)
            lasting = exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM)
            raise StorageError(f"{loc}: {exc.strerror or exc}", loc, lasting=lasting) from None
    import obstore

    store, key = _split(loc)
    try:
        return bytes(obstore.get(store, key).bytes())
    except Exception as exc:
        if missing_ok and _not_found(exc):
            return None
        raise _remote_error(loc, exc) from None


IO_THREADS = 16  # requests in flight at once for one caller of read_many / write_many


def concurrently(function: Any, items: list[Any], remote: bool = True) -> list[Any]:
    """``function`` over ``items``, in order; in threads where they are ``remote`` (object
    stores: the latency of one request instead of the sum of them; a disk has none to hide)."""
    if not remote or len(items) <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(min(IO_THREADS, len(items)), thread_name_prefix="geoseg-io") as pool:
        return list(pool.map(function, items))


_background_pool: tuple[int, ThreadPoolExecutor] | None = None  # with the process that made it
_background_lock = threading.Lock()


def in_background(function: Any, *args: Any, remote: bool = True) -> Future:
    """``function(*args)`` started in a thread where it is ``remote`` (its round trip then
    overlaps the caller's own work), run at once otherwise; its result or error is the future's."""
    global _background_pool
    if not remote:
        done: Future = Future()
        try:
            done.set_result(function(*args))
        except Exception as exc:
            done.set_exception(exc)
        return done
    with _background_lock:
        if _background_pool is None or _background_pool[0] != os.getpid():  # a forked child has no threads
            _background_pool = (os.getpid(), ThreadPoolExecutor(IO_THREADS, thread_name_prefix="geoseg-io"))
        pool = _background_pool[1]
    return pool.submit(function, *args)


def read_many(locs: list[str]) -> list[bytes]:
    """Whole files or objects, in order; the objects fetched concurrently."""
    return concurrently(read_bytes, locs, remote=any(is_url(loc) for loc in locs))


def read_ranges(loc: str, spans: list[list[int]]) -> list[bytes]:
    """The byte ranges ``[start, end)`` of one file or object; on a store fetched together, nearby
    ones in one request."""
    if not is_url(loc):
        with open(loc, "rb") as f:
            return [os.pread(f.fileno(), end - start, start) for start, end in spans]
    import obstore

    store, key = _split(loc)
    try:
        parts = obstore.get_ranges(store, key, starts=[s for s, _ in spans], ends=[e for _, e in spans])
    except Exception as exc:
        raise _remote_error(loc, exc) from None
    return [bytes(part) for part in parts]


def write_many(items: dict[str, bytes]) -> None:
    """Files or objects written whole, objects concurrently; all are written when it returns
    (so the caller may then write what commits them)."""
    concurrently(lambda item: write_bytes(*item), list(items.items()), remote=any(is_url(loc) for loc in items))


def read_text(loc: str) -> str:
    return read_bytes(loc).decode()


def list_files(prefix: str, limit: int | None = None) -> list[str]:
    """Locations of the files under a folder or URL prefix, recursively, sorted."""
    if not is_url(prefix):
        root = Path(prefix)
        return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    return [loc for loc, _ in list_sized(prefix, limit)]


def list_sized(prefix: str, limit: int | None = None) -> list[tuple[str, int]]:
    """The files under a folder or URL prefix with their sizes in bytes, recursively, sorted
    (one listing on a store; a file removed meanwhile on a disk is left out)."""
    if not is_url(prefix):
        found = []
        for loc in list_files(prefix):
            with contextlib.suppress(FileNotFoundError):
                found.append((loc, os.stat(loc).st_size))
        return found
    import obstore

    store, key = _split(prefix)
    root = _root_and_key(prefix)[0] + "/"
    found: list[tuple[str, int]] = []
    try:
        for batch in obstore.list(store, key or None):
            found.extend((root + item["path"], int(item["size"])) for item in batch)
            if limit is not None and len(found) >= limit:
                break
    except Exception as exc:
        raise _remote_error(prefix, exc) from None
    return sorted(found)


def glob(pattern: str) -> list[str]:
    """Files matching a glob pattern (``*``, ``?``, ``[...]``), local or under a URL prefix."""
    if not is_url(pattern):
        return sorted(local_glob.glob(pattern))
    head = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
    prefix = head.rsplit("/", 1)[0] + "/"
    depth = pattern.count("/")  # as a local glob: a wildcard does not cross a "/"
    return [loc for loc in list_files(prefix) if loc.count("/") == depth and fnmatch.fnmatchcase(loc, pattern)]


def scratch_dir(kind: str) -> Path:
    """A new folder in the temporary folder for files built here before they go to their place (a
    COG, a layer for a store), named by this process: those that processes killed before their
    cleanup left (here: the same PID namespace, their PID gone) are removed first."""
    import psutil

    mark = f"geoseg-scratch-{_process_space()}-"
    for old in Path(tempfile.gettempdir()).glob(f"{mark}*"):
        pid = old.name.removeprefix(mark).split("-", 1)[0]
        with contextlib.suppress(OSError):  # swept by another process meanwhile
            if pid.isdigit() and not psutil.pid_exists(int(pid)) and old.stat().st_uid == os.getuid():
                shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{mark}{os.getpid()}-{kind}-"))


@contextlib.contextmanager
def scratch(kind: str) -> Iterator[Path]:
    """A :func:`scratch_dir` for the length of the block."""
    folder = scratch_dir(kind)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _process_space() -> str:
    """This host and PID namespace, as a short digest: a temporary folder shared by hosts (a
    cluster's scratch disk) holds other hosts' folders, whose PIDs mean nothing here."""
    return hashlib.sha256(f"{socket.gethostname()}:{pid_namespace()}".encode()).hexdigest()[:8]


def pid_namespace() -> int:
    """This process's PID namespace (containers on one host never share one)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def remove_temporaries(folder: str, older_than_s: float = 60.0) -> None:
    """Remove what :func:`temporary_beside` (and a lease moved aside) left in a local ``folder``
    (a process killed while it wrote there), untouched for ``older_than_s``; for a folder no
    other process writes files in (OUT, under its lease: another run only tries its lease
    there, in seconds)."""
    if is_url(folder) or not Path(folder).is_dir():
        return
    for leftover in Path(folder).glob(".*"):
        with contextlib.suppress(OSError):  # gone meanwhile
            if (
                # a temporary, the journal SQLite keeps beside one, a lease moved aside
                re.fullmatch(r"\..*\.tmp-[0-9a-f]{8}.*|\.lease\.json\.gone-[0-9a-f]{8}", leftover.name)
                and leftover.is_file()
                and time.time() - leftover.stat().st_mtime > older_than_s
            ):
                leftover.unlink()


@contextlib.contextmanager
def local_copy(loc: str, suffix: str = "") -> Iterator[Path]:
    """``loc`` as a local file for the length of the block (a download for a URL)."""
    if not is_url(loc):
        yield Path(loc)
        return
    with scratch("copy") as tmp:
        path = tmp / (name(loc) or f"object{suffix}")
        download(loc, path)
        yield path


def download(loc: str, path: Path) -> None:
    """The object at URL ``loc`` into the local file ``path``, in chunks (never whole in memory)."""
    import obstore

    store, key = _split(loc)
    try:
        chunks = iter(obstore.get(store, key).stream(min_chunk_size=8 * 2**20))
    except Exception as exc:
        raise _remote_error(loc, exc) from None
    with open(path, "wb") as sink:
        while True:
            try:
                chunk = next(chunks)
            except StopIteration:
                break
            except Exception as exc:  # the store's (a local write error is the file's own)
                raise _remote_error(loc, exc) from None
            sink.write(chunk)


def cached_copy(loc: str) -> Path:
    """A local copy of a URL kept across calls in this machine's temporary folder, fetched again
    when the object changes (its size or time differ): a worker loads a checkpoint once."""
    import obstore

    store, key = _split(loc)
    try:
        meta = obstore.head(store, key)
    except Exception as exc:
        raise _remote_error(loc, exc) from None
    # the object, not its signature: a URL signed again finds the same copy
    tag = f"{unsigned(loc)}|{meta['size']}|{meta['last_modified']}|{meta.get('e_tag')}"
    path = _private_cache() / f"{hashlib.sha256(tag.encode()).hexdigest()[:16]}-{name(loc)}"
    if not path.is_file():  # streamed beside it, then moved into place: never half a copy there
        tmp = temporary_beside(path)
        try:
            download(loc, tmp)
            move_into_place(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def _private_cache() -> Path:
    """This user's cache folder in the temporary folder, which others may list but not enter (a
    folder of that name someone else made is not used)."""
    folder = Path(tempfile.gettempdir()) / f"geoseg-cache-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise StorageError(f"{folder}: not this user's private cache folder", str(folder), "not private")
    return folder


# ---------------------------------------------------------------- writing


def make_dirs(loc: str) -> None:
    """Create a local folder (and its parents); a URL prefix needs none."""
    if is_url(loc):
        _writable(loc)
    else:
        Path(loc).mkdir(parents=True, exist_ok=True)


def write_bytes(loc: str, data: bytes) -> None:
    """Write ``loc`` whole: locally under a temporary name moved into place, remotely as one object."""
    if not is_url(loc):
        path = Path(loc)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_beside(path)
        try:
            tmp.write_bytes(data)
            move_into_place(tmp, path)
        finally:  # a full disk: no half file left beside it
            tmp.unlink(missing_ok=True)
        return
    import obstore

    _writable(loc)
    store, key = _split(loc)
    try:
        obstore.put(store, key, data)
    except Exception as exc:
        raise _remote_error(loc, exc) from None


def temporary_beside(path: Path) -> Path:
    """A temporary name in ``path``'s folder (a rename from it is atomic), hidden, with its
    suffix kept: some writers pick their format by it."""
    return path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")


def move_into_place(tmp: Path, path: Path | str) -> None:
    """Rename a finished temporary file (:func:`temporary_beside`) onto ``path``. A failure (a
    folder of that name, no permission) leaves no temporary file, and names ``path``: the
    temporary name would point the user at a file that is gone."""
    try:
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def write_text(loc: str, text: str) -> None:
    write_bytes(loc, text.encode())


def create(loc: str, data: bytes) -> bool:
    """Write ``loc`` only if it does not exist; whether this call created it. Two callers at
    once: exactly one gets True (a local link, or a conditional PUT)."""
    if not is_url(loc):
        path = Path(loc)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_beside(path)
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links (some FUSE mounts): an exclusive create
            try:
                with open(path, "xb") as f:
                    f.write(data)
                return True
            except FileExistsError:
                return False
        finally:
            tmp.unlink(missing_ok=True)
    import obstore

    _writable(loc)
    store, key = _split(loc)
    try:
        obstore.put(store, key, data, mode="create")
        return True
    except Exception as exc:
        if type(exc).__name__ == "AlreadyExistsError" or "precondition" in str(exc).lower():
            return False
        raise _remote_error(loc, exc) from None


def read_versioned(loc: str) -> tuple[bytes, str | None]:
    """An object's bytes and its version tag (ETag; GCS: generation), for :func:`replace_if`; a
    local file has no tag."""
    if not is_url(loc):
        return read_bytes(loc), None
    import obstore

    store, key = _split(loc)
    try:
        result = obstore.get(store, key)
        # GCS conditions a write on the object's generation, the other stores on its ETag
        tag = result.meta.get("version") if scheme(loc) in GCS_SCHEMES else result.meta.get("e_tag")
        return bytes(result.bytes()), tag
    except Exception as exc:
        raise _remote_error(loc, exc) from None


def replace_if(loc: str, data: bytes, version: str) -> bool:
    """Overwrite the object ``loc`` only if it is still at ``version`` (a conditional PUT,
    If-Match); whether this call replaced it. Two callers with the same version: one succeeds."""
    import obstore

    _writable(loc)
    store, key = _split(loc)
    try:
        obstore.put(store, key, data, mode={"version": version} if scheme(loc) in GCS_SCHEMES else {"e_tag": version})
        return True
    except Exception as exc:
        if type(exc).__name__ in ("PreconditionError", "NotFoundError") or isinstance(exc, FileNotFoundError):
            return False
        raise _remote_error(loc, exc) from None


def delete(loc: str) -> None:
    """Remove a file or object; a missing one is not an error."""
    if not is_url(loc):
        Path(loc).unlink(missing_ok=True)
        return
    import obstore

    store, key = _split(loc)
    try:
        obstore.delete(store, key)
    except FileNotFoundError:
        pass
    except Exception as exc:
        raise _remote_error(loc, exc) from None


def delete_tree(loc: str) -> None:
    """Remove a folder or every object under a URL prefix; a missing one is not an error."""
    if not is_url(loc):
        shutil.rmtree(loc, ignore_errors=True)
        return
    import obstore

    keys = [_split(f)[1] for f in list_files(loc.rstrip("/") + "/")]
    if keys:
        store, _ = _split(loc)
        try:
            obstore.delete(store, keys)
        except Exception as exc:
            raise _remote_error(loc, exc) from None


def clear_tree(loc: str) -> None:
    """Make ``loc`` empty, to write a tree there afresh: every object under a URL prefix, or a
    folder's content (the folder stays, and one reached through a link is cleared where it
    lies). A file there, or content that cannot be removed, is an error."""
    if is_url(loc):
        delete_tree(loc)
        return
    path = Path(loc)
    if path.exists() and not path.is_dir():
        raise StorageError(f"{loc}: is a file, not a folder to write into", loc, "is a file")
    try:
        for entry in path.iterdir() if path.is_dir() else []:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    except OSError as exc:
        raise StorageError(f"{loc}: cannot be cleared ({exc.strerror or exc})", loc, str(exc)) from None


def upload(path: Path, loc: str) -> None:
    """Copy a finished local file to ``loc``: locally under a temporary name moved into place,
    remotely streamed from the file (a multipart upload when large: never whole in memory)."""
    if not is_url(loc):
        if Path(loc).resolve() != Path(path).resolve():
            target = Path(loc)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = temporary_beside(target)
            shutil.copyfile(path, tmp)
            move_into_place(tmp, target)
        return
    import obstore

    _writable(loc)
    store, key = _split(loc)
    try:
        obstore.put(store, key, Path(path))
    except Exception as exc:
        raise _remote_error(loc, exc) from None


@contextlib.contextmanager
def staged(loc: str) -> Iterator[Path]:
    """A local path to write ``loc`` at (GeoPackage, COG: formats written in place), put in its
    place whole when the block ends without an error: a temporary file beside it moved there, or
    uploaded. An error leaves what was at ``loc`` before."""
    if not is_url(loc):
        target = Path(loc)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_beside(target)
        try:
            yield tmp
            move_into_place(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return
    _writable(loc)
    with scratch("upload") as tmp:
        path = tmp / name(loc)
        yield path
        upload(path, loc)


def open_writer(loc: str) -> io.RawIOBase | Any:
    """A binary file to stream ``loc`` into (a multipart upload for a URL); close it to finish,
    or ``abort()`` it (a URL) to drop the upload with the parts already sent."""
    if not is_url(loc):
        Path(loc).parent.mkdir(parents=True, exist_ok=True)
        return open(loc, "wb")  # noqa: SIM115  (the caller closes it)
    _writable(loc)
    return _ObjectWriter(loc)


class _AbortedUploadError(Exception):
    """Raised into an upload's byte stream: obstore then aborts the multipart upload."""


def _chunks(chunks: Any) -> Iterator[bytes]:
    while (chunk := chunks.get()) is not None:
        if isinstance(chunk, _AbortedUploadError):
            raise chunk
        yield chunk


def _upload(loc: str, chunks: Any, failed: list[BaseException]) -> None:
    """``obstore.put`` of the chunks queued for ``loc`` (a thread: it holds no reference to its
    writer, so a writer nobody closes is collected, and aborts)."""
    import obstore

    store, key = _split(loc)
    try:
        obstore.put(store, key, _chunks(chunks))
    except BaseException as exc:  # reported by write() or close() in the caller's thread
        failed.append(exc)
        while not chunks.empty():  # unblock a writer waiting on a full queue
            chunks.get_nowait()


class _ObjectWriter(io.RawIOBase):
    """A streaming upload as a Python binary file (pyarrow asks ``closed`` and ``tell``).

    ``obstore.put`` runs in a thread of its own, fed chunks through a short queue: it aborts
    the multipart upload when its stream fails, which obstore's own writer does not do when it
    is dropped (the parts would stay, billed and invisible, until a lifecycle rule removes them).
    """

    CHUNK = 8 << 20  # bytes gathered before they go to the upload's queue
    QUEUED = 2  # chunks in the queue at most: memory stays bounded when the store is slow

    def __init__(self, loc: str) -> None:
        import queue

        self.loc, self._position = loc, 0
        self._buffer = bytearray()
        self._queue: queue.Queue = queue.Queue(maxsize=self.QUEUED)
        self._failed: list[BaseException] = []
        self._thread = threading.Thread(
            target=_upload, args=(loc, self._queue, self._failed), name=f"upload {name(loc)}", daemon=True
        )
        self._thread.start()

    def _send(self, item: Any) -> None:
        import queue

        while self._thread.is_alive():
            try:
                self._queue.put(item, timeout=1)
                return
            except queue.Full:
                continue
        self._raise()

    def _raise(self) -> None:
        if self._failed and not isinstance(self._failed[0], _AbortedUploadError):
            raise _remote_error(self.loc, self._failed[0]) from None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError(f"{self.loc}: write to a closed or aborted upload")
        chunk = bytes(data)
        self._buffer += chunk
        if len(self._buffer) >= self.CHUNK:
            self._send(bytes(self._buffer))
            self._buffer.clear()
        self._position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        """Send what is left and wait for the upload to complete (the object then exists)."""
        if not self.closed:
            try:
                if self._buffer:
                    self._send(bytes(self._buffer))
                self._send(None)
                self._thread.join()
                self._raise()
            finally:
                super().close()

    def __del__(self) -> None:  # never complete a stream nobody closed: it may be half written
        if threading.current_thread() is not self._thread:  # the upload cannot wait for itself
            with contextlib.suppress(Exception):
                self.abort()

    def abort(self) -> None:
        """Drop the upload: no object is written and the store keeps no part of it."""
        if not self.closed:
            with contextlib.suppress(StorageError):  # an upload that failed already has nothing to drop
                self._send(_AbortedUploadError(self.loc))
            self._thread.join()
            self._buffer.clear()
            super().close()


# ---------------------------------------------------------------- other libraries' views


def zarr_store(loc: str, read_only: bool = False):
    """What zarr opens for ``loc``: the path itself, or zarr's store over obstore."""
    if not is_url(loc):
        return str(loc)
    from zarr.storage import ObjectStore

    if not read_only:
        _writable(loc)
    root, key = _root_and_key(loc.rstrip("/"))
    # the store's URL decodes its path: a key's "#", "?" or "%" are sent encoded
    return ObjectStore(_store(f"{root}/{quote(key, safe='/')}"), read_only=read_only)


def storage_options(loc: str) -> dict[str, Any]:
    """fsspec's options for ``loc`` (what xarray, geopandas and pyarrow take), from the environment."""
    if scheme(loc) != "s3":
        return {}
    endpoint = _endpoint("s3", os.environ)
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def gdal_path(loc: str | Path) -> str:
    """``loc`` as GDAL opens it: /vsis3/, /vsigs/, /vsiaz/, /vsiadls/ or /vsicurl? for URLs."""
    text = str(loc)
    kind = scheme(text)
    if kind not in GDAL_PREFIX:
        return text
    if kind in READ_ONLY:
        # the size from a GET, not a HEAD: a server may refuse HEAD (a signed GET URL's signature
        # covers the method), and GDAL tells so only for AWS's signatures. One request either
        # way. In the name, so that it holds wherever GDAL opens it (a VRT's sources too).
        return f"{GDAL_PREFIX[kind].rstrip('/')}?use_head=no&url={quote(text, safe='')}"
    rest = text.split("://", 1)[1]
    if kind in ("abfs", "abfss"):  # container@account.dfs.core.windows.net/path -> container/path
        container, _, tail = rest.partition("/")
        rest = container.split("@", 1)[0] + "/" + tail
    return GDAL_PREFIX[kind] + rest


def gdal_settings(environ: dict[str, str] | None = None) -> dict[str, str]:
    """GDAL configuration for cloud reads, from the environment the cloud tools use. GDAL reads
    the credentials itself, but not ``AWS_ENDPOINT_URL``: it becomes ``AWS_S3_ENDPOINT`` (host and
    port), ``AWS_HTTPS`` and path-style addressing. Reads of COGs: no directory listing on open,
    merged and multiplexed range requests of 8 MB, a 256 MB cache of them per process."""
    env = os.environ if environ is None else environ
    settings = {
        "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
        "GDAL_HTTP_MULTIPLEX": "YES",
        "GDAL_HTTP_MAX_RETRY": "3",
        "GDAL_HTTP_RETRY_DELAY": "1",
        # Bands of whole file blocks are read, front to back: large range requests (fewer round
        # trips), and a cache that keeps the halo rows a neighbouring block reads again
        # (benchmarks/README.md: 2 MB 1.5x faster than the default 16 KB, 8 MB less again).
        "CPL_VSIL_CURL_CHUNK_SIZE": str(8 << 20),
        "CPL_VSIL_CURL_CACHE_SIZE": str(256 << 20),
    }
    endpoint = _endpoint("s3", env)
    if endpoint and "AWS_S3_ENDPOINT" not in env:
        parts = urlsplit(endpoint)
        settings["AWS_S3_ENDPOINT"] = parts.netloc + parts.path.rstrip("/")
        settings["AWS_HTTPS"] = "NO" if parts.scheme == "http" else "YES"
        settings["AWS_VIRTUAL_HOSTING"] = "FALSE"
    if env.get("AWS_REGION") and "AWS_DEFAULT_REGION" not in env:
        settings["AWS_DEFAULT_REGION"] = env["AWS_REGION"]
    elif env.get("AWS_ACCESS_KEY_ID") and not env.get("AWS_DEFAULT_REGION") and (region := _profile_region(env)):
        # with keys in the environment GDAL (and obstore) look no further for the region: the
        # profile's, as boto3 and the AWS CLI would take it
        settings["AWS_REGION"] = settings["AWS_DEFAULT_REGION"] = region
    # obstore's (and Azure's tools') names for the account, GDAL's own
    for theirs, gdals in (
        ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT"),
        ("AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_ACCESS_KEY"),
    ):
        if env.get(theirs) and gdals not in env:
            settings[gdals] = env[theirs]
    azure = _endpoint("az", env)
    if azure and "AZURE_STORAGE_CONNECTION_STRING" not in env:
        # GDAL takes a custom blob endpoint (Azurite, a sovereign cloud) only in a connection
        # string, with the account's key or a SAS token (Azurite's own where it is the emulator)
        emulator = _azure_emulator(env)
        account = env.get("AZURE_STORAGE_ACCOUNT_NAME") or env.get("AZURE_STORAGE_ACCOUNT")
        account = account or (AZURITE_ACCOUNT if emulator else None)
        key = env.get("AZURE_STORAGE_ACCOUNT_KEY") or env.get("AZURE_STORAGE_ACCESS_KEY")
        key = key or (AZURITE_KEY if emulator else None)
        sas = env.get("AZURE_STORAGE_SAS_TOKEN")
        blob = azure.rstrip("/") + (f"/{account}" if emulator else "")
        protocol = urlsplit(blob).scheme or "https"
        if account and key:
            credential = f"AccountName={account};AccountKey={key}"
        elif sas:
            credential = f"SharedAccessSignature={sas.lstrip('?')}"
        else:  # managed identity and the like: GDAL's own settings, at Azure's own endpoint
            credential = None
        if credential:
            settings["AZURE_STORAGE_CONNECTION_STRING"] = (
                f"DefaultEndpointsProtocol={protocol};{credential};BlobEndpoint={blob};"
            )
    google = _endpoint("gs", env)
    if google:  # a GCS emulator or proxy: GDAL's name for it, which must end in a slash
        settings["CPL_GS_ENDPOINT"] = google.rstrip("/") + "/"
    if _true(env.get("GOOGLE_SKIP_SIGNATURE")):
        settings["GS_NO_SIGN_REQUEST"] = "YES"
    return {k: v for k, v in settings.items() if k not in env}


def _profile_region(env: Any) -> str | None:
    """The region of the AWS profile (``AWS_PROFILE``, or ``default``) in the AWS config file."""
    import configparser

    profile = env.get("AWS_PROFILE") or "default"
    config = configparser.ConfigParser()
    with contextlib.suppress(OSError, configparser.Error):
        config.read(env.get("AWS_CONFIG_FILE") or Path.home() / ".aws" / "config")
    section = profile if profile == "default" else f"profile {profile}"
    return config.get(section, "region", fallback=None)


# Given to GDAL only while a URL is opened: for a local file they would hide its sidecars
# (.tfw, .msk, .ovr, .aux.xml) and change how it is cached.
REMOTE_OPEN_OPTIONS = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "VSI_CACHE": "TRUE"}


def gdal_env(**options):
    """A ``rasterio.Env`` that leaves credentials to GDAL, which reads the same variables (and
    profiles, web identity tokens and instance metadata) itself; the profile's region is put in
    the environment by :func:`gdal_settings`. rasterio's default, where ``AWS_ACCESS_KEY_ID``
    and ``AWS_SECRET_ACCESS_KEY`` are set, builds a boto3 session for every environment: 6-15 ms
    of CPU per scene opened, ~0.5 CPU-s of a 4096 px run (benchmarks/README.md)."""
    import rasterio
    from rasterio.session import DummySession

    return rasterio.Env(session=DummySession(), **options)


def open_raster(loc: str | Path):
    """``rasterio.open`` of a location: a URL through GDAL's network file systems, with the
    options for opening COGs over a network."""
    import rasterio

    text = str(loc)
    if not is_url(text):
        return rasterio.open(text)
    with gdal_env(**REMOTE_OPEN_OPTIONS):
        return rasterio.open(gdal_path(text))


def export_gdal_settings() -> None:
    """Put :func:`gdal_settings` into this process's environment, where GDAL reads its
    configuration (and where the worker processes geoseg starts find it)."""
    os.environ.update(gdal_settings())


export_gdal_settings()
