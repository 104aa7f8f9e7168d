"""atheris (coverage-guided, libFuzzer) harness for the agent's HTTP message readers.

Property: whatever bytes a client or an origin sends, in whatever pieces, :class:`RequestReader`
and :class:`ResponseReader` hand out heads, body pieces and markers or raise
:class:`ProtocolError` with a 4xx/502 status; nothing else escapes, and the body bytes handed out
never exceed the bytes fed.

Run: ``python tests/fuzz/fuzz_http.py [libFuzzer flags] [corpus dirs]``; ``make fuzz-long`` runs it
for ``FUZZ_SECONDS``. A crash is written to ``crash-<sha1>`` and reproduces with
``python tests/fuzz/fuzz_http.py crash-<sha1>``.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from fluidity.agent.http_codec import (
        CLOSED,
        END,
        NEED_DATA,
        ProtocolError,
        RequestHead,
        RequestReader,
        ResponseHead,
        ResponseReader,
    )

_STATUSES = frozenset({400, 414, 431, 502})


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    reader: RequestReader | ResponseReader
    if fdp.ConsumeBool():
        reader = RequestReader(fdp.ConsumeIntInRange(16, 512), fdp.ConsumeIntInRange(1, 20), 1024)
    else:
        reader = ResponseReader(fdp.ConsumeIntInRange(16, 1024))
        reader.expect_response(head_only=fdp.ConsumeBool())
    fed = body = 0
    try:
        while fdp.remaining_bytes():
            piece = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 200))
            if not piece:
                break
            fed += len(piece)
            reader.receive_data(piece)
            while (event := reader.next_event()) is not NEED_DATA:
                if isinstance(event, bytes):
                    body += len(event)
                elif event is END and isinstance(reader, RequestReader):
                    reader.start_next_cycle()
                elif event is END and isinstance(reader, ResponseReader):
                    reader.expect_response(head_only=False)
                elif not isinstance(event, RequestHead | ResponseHead) and event is not CLOSED:
                    raise AssertionError(f"unexpected event {event!r}")
        reader.receive_eof()
        reader.next_event()
    except ProtocolError as exc:
        if exc.status not in _STATUSES or not exc.reason:
            raise AssertionError(f"bad error {exc.status} {exc.reason!r}") from exc
    if body > fed:
        raise AssertionError(f"{body} body bytes out of {fed} fed")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
