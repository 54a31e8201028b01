"""What the data server refuses while parsing a request head, and how it reads the target.

llhttp (strict: no leniency flag is set) refuses malformed framing itself; these are the
limits it does not know (line and field sizes, the field count) and the checks aiohttp's parser
used to add on top of it (a Host on HTTP/1.1, one value of each singleton header). Every
refusal is a catalogued problem; its detail never quotes request bytes (they may hold
credentials).
"""

from __future__ import annotations

from dataclasses import dataclass

import httptools

from proxy.http.problem import ProblemType
from proxy.http.request import HTTP_11, Version, text

# The request line's limit, and the fields' floor (one more, so a refusal names which one).
MAX_REQUEST_LINE = 8190
MAX_HEADERS = 128
# Headers that carry one value: two of them make the request ambiguous (which one does the
# upstream read?), so the request is refused, as aiohttp's parser did.
SINGLETONS = frozenset(
    name.lower().encode()
    for name in (
        "Authorization", "Content-Length", "Content-Location", "Content-Range", "Content-Type",
        "ETag", "Host", "Max-Forwards", "Server", "Transfer-Encoding", "User-Agent",
    )
)


class Refusal(Exception):
    """A request the server answers itself, with this problem, and closes."""

    def __init__(self, problem: ProblemType, detail: str) -> None:
        super().__init__(detail)
        self.problem = problem
        self.detail = detail


@dataclass(frozen=True, slots=True)
class HeadLimits:
    request_line: int
    field: int  # one header line (name and value)
    count: int  # header (and trailer) lines
    head: int  # a whole head: beyond it the parser is not fed more of it

    @classmethod
    def from_config(cls, max_header_bytes: int) -> HeadLimits:
        field = max(max_header_bytes, MAX_REQUEST_LINE + 1)
        return cls(MAX_REQUEST_LINE, field, MAX_HEADERS,
                   MAX_REQUEST_LINE + field + max_header_bytes + 4 * MAX_HEADERS)

    def check(self, version: Version, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        """Refuse a complete head that llhttp accepted but the proxy does not."""
        seen: set[bytes] = set()
        host = False
        for name, _ in headers:
            lower = name.lower()
            if lower in SINGLETONS:
                if lower in seen:
                    raise Refusal(ProblemType.BAD_REQUEST,
                                  f"duplicate {name.decode('latin-1')!r} header")
                seen.add(lower)
                host = host or lower == b"host"
        if version == HTTP_11 and not host:
            raise Refusal(ProblemType.BAD_REQUEST, "an HTTP/1.1 request needs a Host header")


def refusal_for(exc: Exception) -> Refusal:
    """llhttp's reason (a fixed phrase, never request bytes) as a 400 problem."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return Refusal(ProblemType.BAD_REQUEST, reason or "malformed request")


def target_parts(target: bytes) -> tuple[str, str]:
    """The path and query of a request target: origin-form as sent, absolute-form's own path
    (the upstream URL never comes from the target's authority). Asterisk- and authority-form
    come back as they are, for the dispatch to refuse."""
    if target[:1] != b"/" and b"://" in target:
        try:
            url = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:
            return text(target), ""
        return text(url.path or b"/"), text(url.query or b"")
    path, _, query = target.partition(b"#")[0].partition(b"?")
    return text(path), text(query)
