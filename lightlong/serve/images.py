"""Images of chat requests: an `image_url` part's URL read into the model's `ProcessedImage`
before the request is queued, so that a bad image is the request's 400, naming its part.

A `data:image/...;base64,...` URL is decoded in place. An http(s) URL is fetched only when
the server allows it (`--allow-remote-images`: the server would otherwise make requests a
client chooses), with a timeout and a size limit, following redirects to http(s) only; any
other URL (file:, ftp:, a bare path) is refused. Decoding, fetching and tiling run on worker
threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import http.client
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message
from typing import IO

from PIL import Image

from lightlong.model.image import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    ImageProcessor,
    ProcessedImage,
    decode_data_url,
    load_image,
)
from lightlong.serve.protocol import APIError, ImagePart

REMOTE_SCHEMES = ("http", "https")
"""URL schemes fetched with --allow-remote-images."""
_USER_AGENT = "lightlong-serve"


@dataclass(frozen=True)
class ImageSettings:
    """How a server reads request images."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    """Most pixels (h·w) of one image; checked from its header, before it is decoded."""
    max_bytes: int = 20_000_000
    """Most bytes of one encoded image."""
    allow_remote: bool = False
    """Fetch http(s) URLs (else only data: URLs are taken)."""
    timeout_s: float = 10.0
    """Seconds a fetch may wait on the remote server (per connect or read)."""


class ImageReader:
    """Reads the image parts of requests for a vision-language model.

    Args:
        processor: the model's image processor (tiles and normalisation).
        settings: limits, and whether remote URLs are fetched.
    """

    def __init__(self, processor: ImageProcessor, settings: ImageSettings):
        self.processor, self.settings = processor, settings

    async def read_all(self, parts: Sequence[ImagePart]) -> list[ProcessedImage]:
        """Every part's image, in order, each read on a worker thread (side by side).

        Raises:
            APIError: 400 naming the first bad part (`ImagePart.param`) and what is wrong.
        """
        results = await asyncio.gather(
            *(asyncio.to_thread(self.read, part) for part in parts), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)  # type: ignore[arg-type]

    def read(self, part: ImagePart) -> ProcessedImage:
        """One part's image (blocking: fetches, decodes and tiles it).

        Raises:
            APIError: 400 naming part.param: a URL this server does not take, a fetch that
                fails, data that is not a readable image, an image over the limits.
        """
        try:
            image = self._open(part.url, part.param)
            return self.processor(image)
        except APIError:
            raise
        except ValueError as e:  # ImageError, and the processor's size checks
            raise APIError.invalid(f"{part.param}: {e}", part.param) from None

    def _open(self, url: str, param: str) -> Image.Image:
        s = self.settings
        # not urlsplit: it caches its last calls, which would keep clients' data URLs alive
        scheme = url[: url.find(":")].lower() if ":" in url[:16] else ""
        if scheme == "data":
            return decode_data_url(url, max_pixels=s.max_pixels, max_bytes=s.max_bytes)
        if scheme in REMOTE_SCHEMES:
            if not s.allow_remote:
                raise APIError.invalid(
                    f"{param}: this server takes images as data: URLs only "
                    "(data:image/png;base64,...); it fetches http(s) URLs only when started "
                    "with --allow-remote-images",
                    param,
                )
            data = fetch(url, max_bytes=s.max_bytes, timeout_s=s.timeout_s)
            return load_image(data, max_pixels=s.max_pixels)
        shown = url if len(url) <= 40 else url[:37] + "..."
        raise APIError.invalid(
            f"{param}: the url must be a data:image/...;base64 URL"
            f"{' or an http(s) URL' if s.allow_remote else ''}, got {shown!r}",
            param,
        )


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) URLs only (urllib's own also follows ftp:)."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Message,
        newurl: str,
    ) -> urllib.request.Request | None:
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in REMOTE_SCHEMES:
            raise ImageError(f"the image URL redirects to a {scheme or 'relative'}: URL")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url: str, *, max_bytes: int, timeout_s: float) -> bytes:
    """The body of a GET of an http(s) URL, at most max_bytes long, within timeout_s in all
    (each connection and read, and the whole body: a host trickling bytes is cut off).

    Raises:
        ImageError: the fetch fails (an HTTP error status, no connection, a timeout, a
            malformed reply, a redirect away from http(s)) or the body is over max_bytes.
    """
    deadline = time.monotonic() + timeout_s
    opener = urllib.request.build_opener(_HTTPOnlyRedirects())
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        with opener.open(request, timeout=timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise ImageError(
                    f"the image is {int(declared)} bytes, more than the limit of {max_bytes}"
                )
            chunks, size = [], 0
            while size <= max_bytes:
                if time.monotonic() > deadline:
                    raise ImageError(f"fetching the image timed out ({timeout_s:g} s in all)")
                chunk = response.read1(min(1 << 16, max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            data = b"".join(chunks)
    except urllib.error.HTTPError as e:
        raise ImageError(f"fetching the image failed: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise ImageError(f"fetching the image failed: {e.reason}") from None
    except http.client.HTTPException as e:  # a reply that is not HTTP, a cut chunked body
        raise ImageError(f"fetching the image failed: {type(e).__name__}: {e}") from None
    except (OSError, ValueError) as e:  # timeouts, resets, malformed URLs
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"fetching the image failed: {type(e).__name__}: {e}") from None
    if len(data) > max_bytes:
        raise ImageError(f"the image is more than the limit of {max_bytes} bytes")
    return data
