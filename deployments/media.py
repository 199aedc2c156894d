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
import binascii
import io
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path
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
            f"image URL resolves to a non-public address ({ip}); refusing to fetch it",
            param="image_url",
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
        f"image host {host!r} is not in allowed_media_domains", param="image_url", code="forbidden_media_domain"
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
        raise MediaError(f"cannot resolve image host {host!r}: {exc}", param="image_url") from exc
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses:
        raise MediaError(f"image host {host!r} has no address", param="image_url")
    for ip in addresses:
        check_address(ip, policy)
    return addresses[0]


# ---------------------------------------------------------------- fetchers


def decode_data_url(url: str, policy: MediaPolicy) -> bytes:
    """`data:image/<fmt>;base64,<payload>` -> bytes."""
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise MediaError("malformed data URL (no comma)", param="image_url")
    parts = header.split(";")
    mime = parts[0].strip().lower()
    if not mime.startswith("image/"):
        raise MediaError(f"data URL must hold an image, got {mime or 'no'} media type", param="image_url")
    if "base64" not in (p.strip().lower() for p in parts[1:]):
        raise MediaError("data URL images must be base64-encoded", param="image_url")
    if len(payload) * 3 // 4 > policy.max_media_bytes + 3:
        raise MediaError(f"image is larger than {policy.max_media_bytes} bytes", param="image_url")
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"corrupt base64 in data URL: {exc}", param="image_url") from exc


def read_local_file(url: str, policy: MediaPolicy) -> bytes:
    """A file:// URL (or absolute path) inside `local_root`, symlinks resolved."""
    if policy.local_root is None:
        raise MediaError(
            "local image files are disabled (allowed_local_media_path is not set)", param="image_url"
        )
    raw = unquote(urlsplit(url).path) if url.startswith("file:") else url
    real = Path(os.path.realpath(raw))
    if not real.is_relative_to(policy.local_root):
        raise MediaError("image path is outside allowed_local_media_path", param="image_url")
    try:
        size = real.stat().st_size
        if size > policy.max_media_bytes:
            raise MediaError(f"image is larger than {policy.max_media_bytes} bytes", param="image_url")
        return real.read_bytes()
    except OSError as exc:
        raise MediaError(f"cannot read image file: {exc.strerror}", param="image_url") from exc


async def _fetch_one_hop(client: httpx.AsyncClient, url: str, policy: MediaPolicy) -> tuple[str | None, bytes]:
    """GET `url` pinned to its checked IP. Returns (redirect target or None, body)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise MediaError(f"unsupported image URL scheme {parts.scheme!r}", param="image_url")
    if parts.username or parts.password:
        raise MediaError("image URLs with credentials are not allowed", param="image_url")
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
                raise MediaError("image URL redirect without a Location", param="image_url")
            return urljoin(url, location), b""
        if response.status_code != 200:
            raise MediaError(f"image URL returned HTTP {response.status_code}", param="image_url")
        ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
            raise MediaError(f"image URL returned content type {ctype!r}, not an image", param="image_url")
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > policy.max_media_bytes:
            raise MediaError(f"image is larger than {policy.max_media_bytes} bytes", param="image_url")
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > policy.max_media_bytes:
                raise MediaError(f"image is larger than {policy.max_media_bytes} bytes", param="image_url")
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
                raise MediaError(f"image URL redirected more than {MAX_REDIRECTS} times", param="image_url")
    except TimeoutError as exc:
        raise MediaError(
            f"fetching the image took longer than {policy.fetch_timeout_s:g}s",
            param="image_url",
            code="media_fetch_timeout",
        ) from exc
    except httpx.HTTPError as exc:
        raise MediaError(f"cannot fetch image URL: {type(exc).__name__}: {exc}", param="image_url") from exc


async def fetch_image_bytes(url: str, policy: MediaPolicy) -> bytes:
    """The encoded bytes behind an OpenAI `image_url.url`."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url, policy)
    if scheme in ("http", "https"):
        return await fetch_http(url, policy)
    if scheme == "file" or url.startswith("/"):
        return await asyncio.to_thread(read_local_file, url, policy)
    raise MediaError(
        "image_url must be an http(s) URL, a data:image/...;base64 URL or an allowed local file",
        param="image_url",
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
        raise MediaError(f"image is too large: {exc}", param="image_url", code="image_too_large") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError("cannot decode image: not a supported image file", param="image_url") from exc
    if fmt not in ALLOWED_FORMATS:
        raise MediaError(
            f"unsupported image format {fmt}; use one of {', '.join(sorted(ALLOWED_FORMATS))}",
            param="image_url",
        )
    if frames > 1:  # only the first frame would reach the model; say so rather than drop the rest
        raise MediaError(
            f"animated or multi-page images are not supported ({fmt} with {frames} frames); "
            "send the frames as separate images",
            param="image_url",
        )
    try:
        check_image_size(width, height, policy.max_image_pixels)
        return load_image(data, max_pixels=policy.max_image_pixels)
    except ImageTooLargeError as exc:
        raise MediaError(str(exc), param="image_url", code="image_too_large") from exc
    except ImageError as exc:
        raise MediaError(str(exc), param="image_url") from exc


async def load_request_image(url: str, policy: MediaPolicy) -> PIL.Image.Image:
    """Fetch and decode one request image (decode runs off the event loop)."""
    data = await fetch_image_bytes(url, policy)
    return await asyncio.to_thread(decode_image, data, policy)

