"""Cost of fingerprinting keyed JSON bodies: time per typical 1 KiB body against the previous
orjson loads/dumps path, and peak memory and time per 10 MiB body shape (one subprocess each).

Run: python -m bench.fingerprint [--size-mib 10]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

import orjson

from proxy.idempotency.fingerprint import canonical_query, fingerprint, media_type

MiB = 1024 * 1024
DEPTH = 128


def typical(**extra: object) -> bytes:
    doc: dict[str, object] = {
        "amount": 1299, "currency": "eur", "customer": "cus_9s6XKzkNRiz8i3",
        "description": "Order 1234 for Jane Doe", "capture": True, "note": None,
        "metadata": {f"k{i}": f"value-{i}" for i in range(12)},
        "items": [{"sku": f"SKU-{i}", "qty": i, "price": 100 * i} for i in range(8)],
        "shipping": {"name": "Jane", "city": "Berlin", "postal_code": "10115"},
    }
    doc.update(extra)
    return json.dumps(doc, indent=1, ensure_ascii=False).encode()


BODIES = {
    "ints and strings": typical(),
    "with floats": typical(rate=0.125, fee=1.5, lat=52.520008),
    "16-digit string": typical(card="4242424242424242"),
    "Go-escaped <>&": typical(html="<b>&</b>").replace(b"<", b"\\u003c").replace(
        b">", b"\\u003e").replace(b"&", b"\\u0026"),
    "emoji in a value": typical(description="paid \U0001f600"),
    "compact 16 KiB": json.dumps([json.loads(typical())] * 16, separators=(",", ":")).encode(),
}

SHAPES: dict[str, Callable[[int], bytes]] = {
    "[{},{},...]": lambda n: b"[" + b",".join([b"{}"] * (n // 3)) + b"]",
    "[ { } , { } ...]": lambda n: b"[" + b" , ".join([b"{ }"] * (n // 6)) + b"]",
    "one flat object": lambda n: b"{" + b",".join(b'"%x":0' % i for i in range(n // 10)) + b"}",
    "records": lambda n: json.dumps(
        [{"id": i, "name": f"n{i}", "amount": i * 3, "tags": ["a", "b"]} for i in range(n // 60)]
    ).encode(),
    "float records": lambda n: json.dumps(
        [{"id": i, "lat": i * 0.1, "lon": -i / 3} for i in range(n // 55)]
    ).encode(),
    "one long string": lambda n: b'{"s":"' + b"x" * (n - 10) + b'"}',
    "100 objects deep around an array": lambda n: b'{"a":' * 100 + b"[" + b"1," * (n // 2 - 300)
    + b"1]" + b"}" * 100,
    "[[[[[[{}]]]]]] elements": lambda n: b"[" + b",".join([b"[[[[[[{}]]]]]]"] * (n // 15)) + b"]",
}


def orjson_path(body: bytes) -> str:
    """The fingerprint before RFC 8785: the same parts, the body via orjson loads + dumps."""
    media = media_type("application/json")
    digest = hashlib.sha256()
    for part in ("POST", "/v1/payments", canonical_query(""), media):
        digest.update(part.encode("utf-8", "surrogateescape"))
        digest.update(b"\0")
    digest.update(orjson.dumps(orjson.loads(body), option=orjson.OPT_SORT_KEYS))
    return digest.hexdigest()[:40]


def new_path(body: bytes) -> str:
    return fingerprint("POST", "/v1/payments", "", "application/json", body, DEPTH)


def per_call(function: Callable[[bytes], str], body: bytes) -> float:
    number = max(1, 20_000 * 1024 // len(body))
    return min(timeit.repeat(lambda: function(body), number=number, repeat=7)) / number


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+)", text, re.M)
    assert match is not None
    return int(match.group(1)) * 1024


def measure_shape(name: str, size: int) -> None:
    """In a fresh process: peak RSS rise (VmHWM, reset by clear_refs) and time for one body."""
    body = SHAPES[name](size)
    start = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    began = time.perf_counter()
    new_path(body)
    elapsed = time.perf_counter() - began
    rise = _status("VmHWM") - start
    print(f"| {name} | {len(body) / MiB:.1f} | {rise / MiB:.1f} ({rise / len(body):.2f}x) "
          f"| {elapsed:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=float, default=10)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = int(args.size_mib * MiB)
    if args.shape:
        measure_shape(args.shape, size)
        return
    print("| body | bytes | orjson path (us) | fingerprint() (us) |\n|---|---|---|---|")
    for name, body in BODIES.items():
        print(f"| {name} | {len(body)} | {per_call(orjson_path, body) * 1e6:.1f} "
              f"| {per_call(new_path, body) * 1e6:.1f} |")
    print("\n| shape | MiB | peak RSS rise MiB | seconds |\n|---|---|---|---|")
    for name in SHAPES:
        subprocess.run([sys.executable, "-m", "bench.fingerprint", "--size-mib",
                        str(args.size_mib), "--shape", name], check=True)


if __name__ == "__main__":
    main()
