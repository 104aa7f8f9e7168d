"""Receive windows that grow towards the bandwidth-delay product (sans-I/O; the caller's clock).

One stream moves at most ``window / round trip``: a 1 MiB window over a 50 ms path caps a
download at 20 MB/s however fast both ends are. A fixed window large enough for every path would
let each of a thousand streams pin that much memory, so the receiver starts every stream at
``initial_window`` and grows only the windows that are holding their stream back, the way gRPC's
BDP estimator and Linux's receive-buffer auto-tuning do:

1. When a stream that has received more than its window in all gets a DATA frame of at least
   :data:`PROBE_FRAME_BYTES` (a download, not a run of small exchanges), the receiver sends a
   *probe*: a PING whose payload is :data:`PROBE_MAGIC` and a round number
   (keepalive PINGs carry a monotonic timestamp in nanoseconds, whose first byte stays 0 for
   centuries), and notes the time.
2. Until the answer arrives it counts the DATA bytes each stream receives: what the stream moved
   in one round trip.
3. On the answer, a stream that moved at least 2/3 of its window in that round trip, at a rate at
   least :data:`GROWTH_MARGIN` times the best it had shown, while the round trip stayed within
   :data:`QUEUE_TOLERANCE` of the link's shortest, gets its window doubled (at most
   ``max_window``, and within the link's ``growth_budget``). The extra credit is granted at once
   with a WINDOW frame; the protocol needs nothing new.

The last two tests stop growth where the path, not the window, is the limit. Past that point a
larger window only fills the queue in front of the narrowest hop: the round trip grows and the
rate stays flat.

4. The step that found the limit overshoots it (by up to the window it doubled), and that queue
   would stay for the rest of the download: every other stream of the link, a page the user
   opens meanwhile, waits behind it (a standing queue of a round trip or more). So a probe
   round that shows a queue also *shrinks* each grown window that moved at least half of
   itself in it, to :data:`SHRINK_HEADROOM` times the stream's share of the bandwidth-delay
   product (its rate in the round times the shortest round trip) plus the credit the receiver
   holds back between WINDOW frames, never below ``initial_window``. Credit already given cannot
   be taken back; the receiver withholds that much of the credit it would return as the
   application reads, so the peer's window closes down to the new size within a round trip.
   Until all of it is withheld the stream is not cut again: the withholding itself slows the
   sender, and a rate measured meanwhile would cut deeper each round (a spiral down to
   ``initial_window``). A shrunk stream's best rate restarts at the rate it showed, so if the
   queue was someone else's and goes, its window can grow again.

The shortest round trip comes from a probe sent with the session's HELLO, on an idle link, and
from every probe after it. A round that grows nothing makes the next probe wait
:data:`QUIET_ROUND_TRIPS` round trips, so a stream that is as fast as it can be costs a PING every
few round trips, not every one. On loopback the event loops' turns, not the path, set the round
trip under load, so windows there stay as they are (they are not what limits a stream there).

What a stream grew returns to the budget as the credit its shrinking withholds is withheld
(:meth:`WindowTuner.withheld`), and once the stream can receive nothing more (its peer ended
it, or it was reset or closed). Worst-case receive memory of a link is therefore
``streams * initial_window + growth_budget``.
"""

from __future__ import annotations

from collections.abc import Callable

PROBE_MAGIC = b"\xffBDP"
"""First 4 bytes of a probe PING's payload (the other 4 are the round number, big-endian)."""
GROWTH_MARGIN = 1.25
"""A window grows only if its stream's rate in the probe round beat its best earlier rate by
this factor: a stream limited by its window about doubles its rate when the window doubles,
while a stream limited by the path moves within noise of its best."""
PROBE_FRAME_BYTES = 16 * 1024
"""Smallest DATA frame that may start a probe. A sender held back by its window fills its frames
(up to ``max_frame_size``); a keep-alive connection's small requests and answers pass a window in
all after a few thousand exchanges, and would otherwise probe every few round trips for ever
(at c1, 2-4 % on the latency)."""
QUEUE_TOLERANCE = 1.5
"""A window grows only if its probe's round trip was at most this many times the link's shortest:
beyond, bytes are queueing on the path and a larger window would only lengthen the queue."""
QUIET_ROUND_TRIPS = 8
"""Round trips the next probe waits after a round in which no window grew."""
SETTLE_ROUND_TRIPS = 1
"""Round trips the next probe waits after a round that grew or shrank a window."""
SHRINK_HEADROOM = 1.25
"""A window found keeping a queue shrinks to this many times its stream's bandwidth-delay
product: what stays queued is then about a quarter of a round trip's worth, and the slack covers
the credit a receiver holds back until it returns a batch and the bytes waiting to be read.
Measured over a 50 MB/s, 40 ms path (``python -m bench.longpath --rate 50``): 1.5 kept 56 ms
round trips beside a download at 44.4 MB/s, 1.25 kept 48 ms at 44.1 MB/s, 1.1 left the path
under-filled (40.1 MB/s)."""


class WindowTuner:
    """Per-link window growth book-keeping; see the module docstring for the method.

    initial_window: bytes every stream's window starts at (the HELLO's ``initial_window``).
    max_window: bytes no stream's window grows beyond (above ``initial_window``).
    growth_budget: bytes all streams of the link may grow by together, beyond their
        ``initial_window`` (0 = no growth at all).
    clock: seconds from any fixed origin, monotonic (``time.monotonic``); read when a probe
        leaves and when its answer arrives, and by a stream waiting for a quiet period to end.
    credit_batch: bytes of consumed credit the receiver may hold before it returns them (the
        session's WINDOW batching): a window that shrinks keeps that much on top, since the
        sender cannot use it.
    """

    __slots__ = (
        "_baseline_pending",
        "_best_rate",
        "_budget_left",
        "_clock",
        "_min_round_trip",
        "_moved",
        "_quiet_until",
        "_round",
        "_sent_at",
        "_windows",
        "_withholding",
        "credit_batch",
        "growth_budget",
        "initial_window",
        "max_window",
        "probes_sent",
        "windows_grown",
        "windows_shrunk",
    )

    def __init__(
        self,
        initial_window: int,
        max_window: int,
        growth_budget: int,
        clock: Callable[[], float],
        *,
        credit_batch: int = 0,
    ) -> None:
        if max_window <= initial_window:
            raise ValueError("max_window must be above initial_window for windows to grow")
        if growth_budget < 0:
            raise ValueError("growth_budget cannot be negative")
        self.initial_window = initial_window
        self.max_window = max_window
        self.growth_budget = growth_budget
        self.credit_batch = credit_batch
        self._budget_left = growth_budget
        self._clock = clock
        self._windows: dict[int, int] = {}  # only streams that grew
        self._withholding: dict[int, int] = {}  # credit a shrink withholds, not yet withheld
        self._best_rate: dict[int, float] = {}  # bytes/s, streams seen in a probe round
        self._moved: dict[int, int] = {}  # bytes per stream in the round in flight
        self._round = 0
        self._sent_at: float | None = None  # the round in flight, if any
        self._quiet_until = 0.0
        self._min_round_trip = float("inf")
        self._baseline_pending = False
        #: Running totals, for metrics and tests.
        self.probes_sent = 0
        self.windows_grown = 0
        self.windows_shrunk = 0

    @property
    def budget_left(self) -> int:
        """Bytes the link's windows may still grow by together."""
        return self._budget_left

    def window(self, stream_id: int) -> int:
        """The receive window of ``stream_id`` now (bytes)."""
        return self._windows.get(stream_id, self.initial_window)

    @property
    def grown_bytes(self) -> int:
        """Bytes by which the windows of the streams still receiving have grown, together."""
        return self.growth_budget - self._budget_left

    @property
    def min_round_trip(self) -> float:
        """Seconds: the shortest probe round trip seen on the link (inf before the first)."""
        return self._min_round_trip

    def baseline_probe(self) -> bytes:
        """The payload of a probe to send with HELLO, on the idle link: the path's round trip."""
        self._baseline_pending = True
        return self._start_round(self._clock())

    def _start_round(self, now: float) -> bytes:
        self._round = (self._round + 1) & 0xFFFFFFFF
        self._sent_at = now
        self._moved = {}
        self.probes_sent += 1
        return PROBE_MAGIC + self._round.to_bytes(4, "big")

    def on_data(self, stream_id: int, nbytes: int, received: int) -> bytes | None:
        """``nbytes`` of DATA arrived on ``stream_id``, which has received ``received`` in all.

        Returns the 8-byte payload of a probe PING to send now, or None.
        """
        if self._sent_at is not None:
            moved = self._moved
            moved[stream_id] = moved.get(stream_id, 0) + nbytes
            return None
        window = self._windows.get(stream_id, self.initial_window)
        if nbytes < PROBE_FRAME_BYTES or received <= window:
            return None
        if stream_id not in self._windows and self._budget_left <= 0:
            return None  # an initial window that cannot grow and cannot shrink

        now = self._clock()
        if now < self._quiet_until:
            return None
        return self._start_round(now)  # this frame came before the probe: it does not count

    def on_pong(self, payload: bytes) -> list[tuple[int, int]] | None:
        """A PING answer arrived; return the window changes it earns, as (stream id, bytes).

        A positive change is extra credit to grant at once; a negative one is credit to withhold
        from what the stream returns next (its window shrank). Returns None if ``payload`` is
        not a probe's (a keepalive's answer, for the caller to surface), and an empty list for
        a probe that changes nothing or is stale.
        """
        if payload[:4] != PROBE_MAGIC or len(payload) != 8:
            return None
        sent_at = self._sent_at
        if sent_at is None or int.from_bytes(payload[4:], "big") != self._round:
            return []
        now = self._clock()
        round_trip = max(now - sent_at, 1e-6)
        self._sent_at = None
        moved, self._moved = self._moved, {}
        self._min_round_trip = min(self._min_round_trip, round_trip)
        if self._baseline_pending:
            self._baseline_pending = False
            return []
        if round_trip > QUEUE_TOLERANCE * self._min_round_trip:
            changes = self._shrink(moved, round_trip)
        else:
            changes = self._grow(moved, round_trip)
        # After a change, wait out the round trip in which it reaches the sender and its bytes
        # come back, so that the next round measures the new window.
        quiet = SETTLE_ROUND_TRIPS if changes else QUIET_ROUND_TRIPS
        self._quiet_until = now + quiet * round_trip
        return changes

    def _grow(self, moved: dict[int, int], round_trip: float) -> list[tuple[int, int]]:
        grants: list[tuple[int, int]] = []
        for stream_id, nbytes in moved.items():
            rate = nbytes / round_trip
            best = self._best_rate.get(stream_id, 0.0)
            if rate <= best:
                continue
            self._best_rate[stream_id] = rate
            window = self._windows.get(stream_id, self.initial_window)
            if nbytes * 3 < window * 2 or rate < best * GROWTH_MARGIN:
                continue
            increment = min(window, self.max_window - window, self._budget_left)
            if increment <= 0:
                continue
            self._windows[stream_id] = window + increment
            self._budget_left -= increment
            self.windows_grown += 1
            grants.append((stream_id, increment))
        return grants

    def _shrink(self, moved: dict[int, int], round_trip: float) -> list[tuple[int, int]]:
        cuts: list[tuple[int, int]] = []
        for stream_id, nbytes in moved.items():
            window = self._windows.get(stream_id)
            if window is None:
                continue  # at its initial window: the queue is not one it grew
            if stream_id in self._withholding or nbytes * 2 < window:
                # Still withholding an earlier cut (which starves the sender for a while, so
                # its rate says nothing), or not feeding the queue: cutting again would spiral.
                continue
            rate = nbytes / round_trip
            share = int(rate * self._min_round_trip * SHRINK_HEADROOM) + self.credit_batch
            target = max(self.initial_window, share)
            if target >= window:
                continue
            if target == self.initial_window:
                del self._windows[stream_id]
            else:
                self._windows[stream_id] = target
            # The budget comes back as the credit is withheld (withheld()): until then the
            # peer may still send that much.
            self._withholding[stream_id] = window - target
            self._best_rate[stream_id] = rate
            self.windows_shrunk += 1
            cuts.append((stream_id, target - window))
        return cuts

    def withheld(self, stream_id: int, nbytes: int) -> None:
        """``nbytes`` of credit a shrink of ``stream_id`` asked for were withheld: the peer can
        no longer send them, so they return to the budget."""
        owed = self._withholding.get(stream_id, 0)
        back = min(owed, nbytes)  # never more than a cut asked for (a stream forgotten meanwhile)
        if owed > back:
            self._withholding[stream_id] = owed - back
        else:
            self._withholding.pop(stream_id, None)
        self._budget_left += back

    def forget(self, stream_id: int) -> None:
        """``stream_id`` receives nothing more: return what it grew to the budget."""
        grown = self._windows.pop(stream_id, None)
        if grown is not None:
            self._budget_left += grown - self.initial_window
        self._budget_left += self._withholding.pop(stream_id, 0)
        self._best_rate.pop(stream_id, None)
        self._moved.pop(stream_id, None)
