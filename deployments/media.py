"""Loading request images safely: data: URLs, http(s) with an SSRF guard, local files.

http(s) fetching resolves the host once, refuses any address that is not
globally routable (loopback, private, link-local incl. cloud metadata,
multicast, reserved, CGNAT...) unless it lies in an allow-listed network, then
connects to that very IP (Host header and TLS SNI carry the name), so a second
DNS answer cannot rebind the request. Redirects are followed by hand, each hop
checked the same way. The body is streamed with a byte cap; the whole fetch
(DNS, every hop, body) runs under one deadline.

Decoding reads the image header first (`PIL.Image.open` is lazy) and rejects
oversized images before any pixel is decoded.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import binascii
import io
import ipaddress
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import httpx
import PIL.Image

from deployments.config import LimitsConfig
from deployments.errors import MediaError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"})
MAX_REDIRECTS = 5


@dataclass(frozen=True, slots=True)
class MediaPolicy:
    """What a deployment lets a request fetch (built once from LimitsConfig)."""

    fetch_timeout_s: float
    max_media_bytes: int
    max_image_pixels: int
    allowed_domains: tuple[str, ...] = ()
    allowed_networks: tuple[IPNetwork, ...] = ()
    local_root: Path | None = None
    kind: str = "image"  # "video" for video_url parts: their MIME prefix, limits and error param

    @property
    def param(self) -> str:
        return f"{self.kind}_url"

    def for_videos(self, max_video_bytes: int) -> MediaPolicy:
        """The same fetch rules for `video_url` parts, with the video byte limit."""
        return dataclasses.replace(self, kind="video", max_media_bytes=max_video_bytes)

    @classmethod
    def from_limits(cls, limits: LimitsConfig) -> MediaPolicy:
        root = limits.allowed_local_media_path
        return cls(
            fetch_timeout_s=limits.media_fetch_timeout_s,
            max_media_bytes=limits.max_media_bytes,
            max_image_pixels=limits.max_image_pixels,
            allowed_domains=tuple(limits.allowed_media_domains),
            allowed_networks=tuple(
                ipaddress.ip_network(c, strict=False) for c in limits.allowed_media_networks
            ),
            local_root=Path(os.path.realpath(Path(root).expanduser())) if root else None,
        )


# ---------------------------------------------------------------- address checks


def _unmapped(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
    return ip


def check_address(ip: IPAddress, policy: MediaPolicy) -> None:
    """Refuse an address that is not globally routable unless allow-listed."""
    ip = _unmapped(ip)
    if any(ip in net for net in policy.allowed_networks if net.version == ip.version):
        return
    if not ip.is_global or ip.is_multicast or ip.is_reserved:
        raise MediaError(
            f"{policy.kind} URL resolves to a non-public address ({ip}); refusing to fetch it",
            param=policy.param,
            code="forbidden_media_address",
        )


def check_host(host: str, policy: MediaPolicy) -> None:
    """Enforce the domain allow-list (exact host or a subdomain of an entry)."""
    if not policy.allowed_domains:
        return
    host = host.lower().rstrip(".")
    if any(host == d or host.endswith("." + d) for d in policy.allowed_domains):
        return
    raise MediaError(
        f"{policy.kind} host {host!r} is not in allowed_media_domains", param=policy.param, code="forbidden_media_domain"
    )


async def resolve_host(host: str, port: int, policy: MediaPolicy) -> IPAddress:
    """Resolve once; every answer must pass `check_address`. Returns the one to connect to."""
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        check_address(literal, policy)
        return literal
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise MediaError(f"cannot resolve {policy.kind} host {host!r}: {exc}", param=policy.param) from exc
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses:
        raise MediaError(f"{policy.kind} host {host!r} has no address", param=policy.param)
    for ip in addresses:
        check_address(ip, policy)
    return addresses[0]


# ---------------------------------------------------------------- fetchers


_BASE64_WHITESPACE = str.maketrans("", "", " \t\r\n")  # dropped from wrapped base64


def decode_data_url(url: str, policy: MediaPolicy) -> bytes:
    """`data:image/<fmt>;base64,<payload>` -> bytes."""
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise MediaError("malformed data URL (no comma)", param=policy.param)
    parts = header.split(";")
    mime = parts[0].strip().lower()
    if not mime.startswith(f"{policy.kind}/"):
        raise MediaError(f"data URL must hold an {policy.kind}, got {mime or 'no'} media type", param=policy.param)
    if "base64" not in (p.strip().lower() for p in parts[1:]):
        raise MediaError(f"data URL {policy.kind}s must be base64-encoded", param=policy.param)
    if len(payload) * 3 // 4 > policy.max_media_bytes + 3:
        raise MediaError(f"{policy.kind} is larger than {policy.max_media_bytes} bytes", param=policy.param)
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        # MIME-wrapped base64 (`base64 file` wraps at 76 columns) is valid with its line breaks removed;
        # anything else outside the alphabet stays an error.
        unwrapped = payload.translate(_BASE64_WHITESPACE)
        if len(unwrapped) != len(payload):
            try:
                return base64.b64decode(unwrapped, validate=True)
            except (binascii.Error, ValueError):
                pass
        raise MediaError(f"corrupt base64 in data URL: {exc}", param=policy.param) from exc


def read_local_file(url: str, policy: MediaPolicy) -> bytes:
    """A file:// URL (or absolute path) inside `local_root`, symlinks resolved."""
    if policy.local_root is None:
        raise MediaError(
            f"local {policy.kind} files are disabled (allowed_local_media_path is not set)", param=policy.param
        )
    raw = unquote(urlsplit(url).path) if url.startswith("file:") else url
    real = Path(os.path.realpath(raw))
    if not real.is_relative_to(policy.local_root):
        raise MediaError(f"{policy.kind} path is outside allowed_local_media_path", param=policy.param)
    try:
        size = real.stat().st_size
        if size > policy.max_media_bytes:
            raise MediaError(f"{policy.kind} is larger than {policy.max_media_bytes} bytes", param=policy.param)
        return real.read_bytes()
    except OSError as exc:
        raise MediaError(f"cannot read {policy.kind} file: {exc.strerror}", param=policy.param) from exc


async def _fetch_one_hop(client: httpx.AsyncClient, url: str, policy: MediaPolicy) -> tuple[str | None, bytes]:
    """GET `url` pinned to its checked IP. Returns (redirect target or None, body)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise MediaError(f"unsupported {policy.kind} URL scheme {parts.scheme!r}", param=policy.param)
    if parts.username or parts.password:
        raise MediaError(f"{policy.kind} URLs with credentials are not allowed", param=policy.param)
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    check_host(host, policy)
    ip = await resolve_host(host, port, policy)
    ip_host = f"[{ip}]" if ip.version == 6 else str(ip)
    target = parts._replace(netloc=f"{ip_host}:{port}").geturl()
    host_header = parts.netloc.rpartition("@")[2]
    request = client.build_request(
        "GET", target, headers={"Host": host_header}, extensions={"sni_hostname": host}
    )
    response = await client.send(request, stream=True)
    try:
        if response.is_redirect:
            location = response.headers.get("location")
            if not location:
                raise MediaError(f"{policy.kind} URL redirect without a Location", param=policy.param)
            return urljoin(url, location), b""
        if response.status_code != 200:
            raise MediaError(f"{policy.kind} URL returned HTTP {response.status_code}", param=policy.param)
        ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and not (ctype.startswith(f"{policy.kind}/") or ctype == "application/octet-stream"):
            raise MediaError(f"{policy.kind} URL returned content type {ctype!r}, not an {policy.kind}", param=policy.param)
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > policy.max_media_bytes:
            raise MediaError(f"{policy.kind} is larger than {policy.max_media_bytes} bytes", param=policy.param)
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > policy.max_media_bytes:
                raise MediaError(f"{policy.kind} is larger than {policy.max_media_bytes} bytes", param=policy.param)
        return None, bytes(body)
    finally:
        await response.aclose()


async def fetch_http(url: str, policy: MediaPolicy) -> bytes:
    """Fetch an http(s) image under the SSRF guard, size cap and total deadline."""
    try:
        async with asyncio.timeout(policy.fetch_timeout_s):
            async with httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=None) as client:
                for _ in range(MAX_REDIRECTS + 1):
                    redirect, body = await _fetch_one_hop(client, url, policy)
                    if redirect is None:
                        return body
                    url = redirect
                raise MediaError(f"{policy.kind} URL redirected more than {MAX_REDIRECTS} times", param=policy.param)
    except TimeoutError as exc:
        raise MediaError(
            f"fetching the {policy.kind} took longer than {policy.fetch_timeout_s:g}s",
            param=policy.param,
            code="media_fetch_timeout",
        ) from exc
    except httpx.HTTPError as exc:
        raise MediaError(f"cannot fetch {policy.kind} URL: {type(exc).__name__}: {exc}", param=policy.param) from exc


async def fetch_image_bytes(url: str, policy: MediaPolicy) -> bytes:
    """The encoded bytes behind an OpenAI `image_url.url` (or `video_url.url` under a video policy)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url, policy)
    if scheme in ("http", "https"):
        return await fetch_http(url, policy)
    if scheme == "file" or url.startswith("/"):
        return await asyncio.to_thread(read_local_file, url, policy)
    raise MediaError(
        f"{policy.param} must be an http(s) URL, a data:{policy.kind}/...;base64 URL or an allowed local file",
        param=policy.param,
    )


# ---------------------------------------------------------------- decoding


def decode_image(data: bytes, policy: MediaPolicy) -> PIL.Image.Image:
    """Bytes -> RGB PIL image; size checked from the header before decoding pixels."""
    from models.processor import ImageError, ImageTooLargeError, check_image_size, load_image

    try:
        with PIL.Image.open(io.BytesIO(data)) as header:
            fmt = header.format
            width, height = header.size
            frames = getattr(header, "n_frames", 1)
    except PIL.Image.DecompressionBombError as exc:
        raise MediaError(f"image is too large: {exc}", param=policy.param, code="image_too_large") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError("cannot decode image: not a supported image file", param=policy.param) from exc
    if fmt not in ALLOWED_FORMATS:
        raise MediaError(
            f"unsupported image format {fmt}; use one of {', '.join(sorted(ALLOWED_FORMATS))}",
            param=policy.param,
        )
    if frames > 1:  # only the first frame would reach the model; say so rather than drop the rest
        raise MediaError(
            f"animated or multi-page images are not supported ({fmt} with {frames} frames); "
            "send the frames as separate images",
            param=policy.param,
        )
    try:
        check_image_size(width, height, policy.max_image_pixels)
        return load_image(data, max_pixels=policy.max_image_pixels)
    except ImageTooLargeError as exc:
        raise MediaError(str(exc), param=policy.param, code="image_too_large") from exc
    except ImageError as exc:
        raise MediaError(str(exc), param=policy.param) from exc


def decode_data_image(url: str, policy: MediaPolicy) -> PIL.Image.Image:
    """A `data:image/...;base64,` URL -> RGB PIL image (base64 and pixel decode in one call)."""
    return decode_image(decode_data_url(url, policy), policy)


async def load_request_image(url: str, policy: MediaPolicy,
                             prepare: Callable[[bytes], Any] | None = None) -> Any:
    """Fetch and decode one request image, off the event loop: a data URL's base64 decode
    (milliseconds for a photo) runs in the same worker thread as the pixel decode.

    With `prepare`, that thread hands it the encoded bytes instead and returns what it makes of
    them (the router's: a known image's key without decoding it, else `decode_image`, the content
    key and the resize: one thread hop per image, not one per stage).

    Returns:
        The RGB PIL image, or what `prepare` made of the bytes.
    """
    if url[:5].lower() == "data:":
        return await asyncio.to_thread(_decoded, decode_data_url, url, policy, prepare)
    data = await fetch_image_bytes(url, policy)
    return await asyncio.to_thread(_decoded, lambda d, _: d, data, policy, prepare)


def _decoded(read: Callable[[Any, MediaPolicy], bytes], source: Any, policy: MediaPolicy,
             prepare: Callable[[bytes], Any] | None) -> Any:
    data = read(source, policy)
    return decode_image(data, policy) if prepare is None else prepare(data)


async def load_request_video(url: str, policy: MediaPolicy, processor: Any, limits: Any) -> Any:
    """Fetch, decode (only the sampled frames) and resize one request video, off the event loop.

    Args:
        policy: a video policy (`MediaPolicy.for_videos`); processor: a `VideoProcessor`;
        limits: `models.video_io.VideoLimits`.
    Returns:
        `models.video_io.PreparedVideo`.
    Raises:
        MediaError: unreachable, not a video, or over a limit (HTTP 400).
    """
    from models.processor import ImageError
    from models.video_io import VideoDecodeError, prepare_video

    data = await fetch_image_bytes(url, policy)
    try:
        return await asyncio.to_thread(prepare_video, data, processor, limits)
    except VideoDecodeError as exc:
        raise MediaError(str(exc), param=policy.param, code=exc.code) from exc
    except (ImageError, ValueError) as exc:  # VideoError is a ValueError: too few frames, bad size
        raise MediaError(f"cannot use the video: {exc}", param=policy.param) from exc
