"""deployments.media: data URLs, SSRF guard, local files, header-first size check."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import time

import pytest

from deployments.config import LimitsConfig
from deployments.errors import MediaError
from deployments.media import (
    MediaPolicy,
    check_address,
    decode_image,
    fetch_image_bytes,
    load_request_image,
)
from tests.deployments.helpers import (
    LocalServer,
    data_url,
    endless_body,
    png_bytes,
    png_header_only,
    redirect_to,
    send_body,
    slow_body,
)


def policy(**limits) -> MediaPolicy:
    return MediaPolicy.from_limits(LimitsConfig(**limits))


def run(coro):
    return asyncio.run(coro)


def test_data_url_roundtrip():
    data = png_bytes(40, 30)
    assert run(fetch_image_bytes(data_url(data), policy())) == data
    image = run(load_request_image(data_url(data), policy()))
    assert image.size == (40, 30) and image.mode == "RGB"


def test_data_url_with_wrapped_base64():
    """Base64 wrapped at 76 columns (what `base64 file` prints) decodes to the same bytes; other stray
    characters stay an error."""
    data = png_bytes(40, 30)
    encoded = base64.b64encode(data).decode()
    wrapped = "\r\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76)) + "\n"
    assert run(fetch_image_bytes(f"data:image/png;base64,{wrapped}", policy())) == data
    with pytest.raises(MediaError, match="corrupt base64"):
        run(fetch_image_bytes(f"data:image/png;base64,{encoded[:40]}\n*{encoded[40:]}", policy()))


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("data:image/png;base64,@@@notbase64@@@", "corrupt base64"),
        ("data:text/plain;base64,aGVsbG8=", "must hold an image"),
        ("data:image/png,rawbytes", "base64"),
        ("data:image/png;base64", "malformed"),
        ("ftp://example.com/a.png", "must be an http"),
        ("gopher:x", "must be an http"),
    ],
)
def test_bad_urls(url, fragment):
    with pytest.raises(MediaError, match=fragment):
        run(fetch_image_bytes(url, policy()))


def test_data_url_that_is_not_an_image():
    with pytest.raises(MediaError, match="cannot decode"):
        run(load_request_image(data_url(b"hello, not an image"), policy()))


def test_unsupported_format():
    import io

    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.new("RGB", (8, 8)).save(buf, format="PPM")
    with pytest.raises(MediaError, match="unsupported image format PPM"):
        decode_image(buf.getvalue(), policy())


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "TIFF"])
def test_animated_or_multipage_image_refused(fmt):
    import io

    import PIL.Image

    first, second = PIL.Image.new("RGB", (16, 8), "red"), PIL.Image.new("RGB", (16, 8), "blue")
    buf = io.BytesIO()
    first.save(buf, format=fmt, save_all=True, append_images=[second])
    with pytest.raises(MediaError, match=r"2 frames\); send the frames as separate images"):
        decode_image(buf.getvalue(), policy())
    single = io.BytesIO()
    first.save(single, format=fmt)
    assert decode_image(single.getvalue(), policy()).size == (16, 8)


def test_oversized_image_rejected_from_header():
    bomb = png_header_only(50_000, 50_000)  # 2.5 G pixels claimed, ~100 bytes
    with pytest.raises(MediaError, match="pixels|too large") as info:
        decode_image(bomb, policy(max_image_pixels=1_000_000))
    assert info.value.code == "image_too_large"


def test_one_pixel_image_decodes():
    assert decode_image(png_bytes(1, 1), policy()).size == (1, 1)


@pytest.mark.parametrize(
    "ip, ok",
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # CGNAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("fe80::1", False),
        ("fd00:ec2::254", False),
    ],
)
def test_check_address(ip, ok):
    address = ipaddress.ip_address(ip)
    if ok:
        check_address(address, policy())
    else:
        with pytest.raises(MediaError, match="non-public"):
            check_address(address, policy())


def test_allowed_network_opens_only_that_network():
    p = policy(allowed_media_networks=["127.0.0.1/32"])
    check_address(ipaddress.ip_address("127.0.0.1"), p)
    with pytest.raises(MediaError):
        check_address(ipaddress.ip_address("127.0.0.2"), p)


def test_private_address_refused_with_zero_hits():
    with LocalServer({"/a.png": send_body(png_bytes())}) as server:
        with pytest.raises(MediaError, match="non-public"):
            run(fetch_image_bytes(server.url("/a.png"), policy()))
        # "localhost" resolves to loopback too: same refusal, no connection.
        with pytest.raises(MediaError, match="non-public"):
            run(fetch_image_bytes(f"http://localhost:{server.port}/a.png", policy()))
        assert sum(server.hits.values()) == 0


def test_allow_listed_fetch_and_errors():
    body = png_bytes()
    routes = {
        "/a.png": send_body(body),
        "/page.html": send_body(b"<html></html>", content_type="text/html"),
        "/big.png": endless_body(),
    }
    p = policy(allowed_media_networks=["127.0.0.1/32"], max_media_bytes=1_000_000)
    with LocalServer(routes) as server:
        assert run(fetch_image_bytes(server.url("/a.png"), p)) == body
        with pytest.raises(MediaError, match="HTTP 404"):
            run(fetch_image_bytes(server.url("/missing.png"), p))
        with pytest.raises(MediaError, match="content type 'text/html'"):
            run(fetch_image_bytes(server.url("/page.html"), p))
        with pytest.raises(MediaError, match="larger than 1000000 bytes"):
            run(fetch_image_bytes(server.url("/big.png"), p))


def test_fetch_timeout_is_total():
    p = policy(allowed_media_networks=["127.0.0.1/32"], media_fetch_timeout_s=0.5)
    with LocalServer({"/slow.png": slow_body(5.0)}) as server:
        start = time.monotonic()
        with pytest.raises(MediaError, match="longer than 0.5s") as info:
            run(fetch_image_bytes(server.url("/slow.png"), p))
        assert time.monotonic() - start < 2.0
        assert info.value.code == "media_fetch_timeout"


def test_redirect_hops_are_rechecked():
    with LocalServer({"/secret.png": send_body(png_bytes())}, host="127.0.0.2") as target:
        with LocalServer({"/r": redirect_to(target.url("/secret.png"))}) as front:
            p = policy(allowed_media_networks=["127.0.0.1/32"])
            with pytest.raises(MediaError, match="non-public address \\(127.0.0.2\\)"):
                run(fetch_image_bytes(front.url("/r"), p))
            assert front.hits["/r"] == 1
            assert sum(target.hits.values()) == 0


def test_domain_allow_list():
    with LocalServer({"/a.png": send_body(png_bytes())}) as server:
        p = policy(allowed_media_domains=["example.com"], allowed_media_networks=["127.0.0.0/8"])
        with pytest.raises(MediaError, match="not in allowed_media_domains"):
            run(fetch_image_bytes(server.url("/a.png"), p))
        p = policy(allowed_media_domains=["localhost"], allowed_media_networks=["127.0.0.0/8", "::1/128"])
        assert run(fetch_image_bytes(f"http://localhost:{server.port}/a.png", p)) == png_bytes()
        assert server.hits["/a.png"] == 1


def test_local_files(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (root / "ok.png").write_bytes(png_bytes())
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes())
    os.symlink(secret, root / "link.png")
    p = policy(allowed_local_media_path=str(root))
    assert run(fetch_image_bytes(f"file://{root}/ok.png", p)) == png_bytes()
    for bad in (f"file://{root}/../secret.png", f"file://{root}/link.png", str(secret)):
        with pytest.raises(MediaError, match="outside allowed_local_media_path"):
            run(fetch_image_bytes(bad, p))
    with pytest.raises(MediaError, match="local image files are disabled"):
        run(fetch_image_bytes(f"file://{root}/ok.png", policy()))
