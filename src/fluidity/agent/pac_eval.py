"""One PAC evaluation in a child process: ``python -m fluidity.agent.pac_eval``.

dukpy holds the GIL while JavaScript runs, so a PAC script that loops forever would freeze the
whole agent if it ran in-process, even in a thread. In a child process it can be killed when its
time is up. Reads ``{"pac": ..., "url": ..., "host": ...}`` as JSON on stdin; writes
``{"result": "PROXY ...; DIRECT"}`` or ``{"error": "..."}`` on stdout.
"""

from __future__ import annotations

import json
import sys


def evaluate(pac_text: str, url: str, host: str) -> dict[str, str]:
    """Run ``FindProxyForURL(url, host)`` of ``pac_text`` with pypac; the result or the error."""
    from pypac.parser import MalformedPacError, PACFile

    try:
        pac = PACFile(pac_text)
    except MalformedPacError as exc:
        return {"error": _one_line(str(exc))}
    except Exception as exc:  # dukpy errors for scripts it cannot even load
        return {"error": f"not a valid PAC script: {_one_line(str(exc))}"}
    try:
        return {"result": str(pac.find_proxy_for_url(url, host))}
    except Exception as exc:  # a JavaScript run-time error
        return {"error": f"FindProxyForURL failed: {_one_line(str(exc))}"}


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


def main() -> int:
    request = json.load(sys.stdin)
    json.dump(evaluate(request["pac"], request["url"], request["host"]), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
