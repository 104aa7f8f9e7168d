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
   round that shows a queue (a round trip over :data:`QUEUE_TOLERANCE` times the *unloaded*
   one: the shortest, plus the time the round's largest frame takes to cross the path, which
   the answer waits behind) also *shrinks* each grown window that moved at least half of
   itself in it, to :data:`SHRINK_HEADROOM` times the stream's share of the bandwidth-delay
   product (its rate in the round times the shortest round trip) plus the credit the receiver
   holds back between WINDOW frames, never below ``initial_window``. The rate is what the
   stream moved per round trip, or its window less that credit per round trip if more: a
   window-limited stream has that in flight, and a slow path's round trip holds few frames,
   so what it moved can be a frame short. A round trip between
   the two thresholds grows and cuts nothing. Credit already given cannot
   be taken back; the receiver withholds that much of the credit it would return as the
   application reads, so the peer's window closes down to the new size within a round trip.
   Until all of it is withheld the stream is not cut again: the withholding itself slows the
   sender, and a rate measured meanwhile would cut deeper each round (a spiral down to
   ``initial_window``). A shrunk stream's best rate restarts at the rate it showed, so if the
   queue was someone else's and goes, its window can grow again.
5. On a link whose shortest round trip is at least :data:`SHORTEST_ROUND_TRIP_TO_CUT`, a window
   may also be cut below ``initial_window`` (never below :data:`SMALLEST_WINDOW`): on a slow
   path the initial window itself is the queue (1 MiB at 1 MiB/s is a second in front of every
   other stream). Such a window returns its credit in batches of a quarter of itself, not of
   the initial window, or the batches alone would starve its sender; its target is therefore
   the share, taken over the unloaded round trip (on such a path a frame in flight is a large
   part of what fills it), times 3/2 (what the receiver holds back is a third of it on
   average). It grows back, up to ``initial_window`` without touching the budget, when its
   rate rises (the path freed up) as any window does.
6. On such a link the receiver also asks the sender for smaller DATA frames (a FRAME_SIZE
   frame; :meth:`WindowTuner.take_frame_size`): a frame takes ``size / rate`` to cross the
   path, and the probe's answer and every other stream's next frame wait behind it.

Measured over a 1 MiB/s, 200 ms relay (``tests/faults/test_slow_link.py``): a small request beside
a download waited 985 ms with the initial window, 734 ms once it was cut (5.), 359 ms once the
frames were 16 KiB too (6.), the download at 0.98 MiB/s throughout.

The shortest round trip comes from a probe sent with the session's HELLO, on an idle link
(timed from when the link first takes bytes to write, as the session is made before its
connection's handshake), and from every probe after it. A round that grows nothing makes the
next probe wait :data:`QUIET_ROUND_TRIPS` round trips, so a stream that is as fast as it can be
costs a PING every few round trips, not every one. On loopback the event loops' turns, not the
path, set the round trip under load, so windows there stay as they are (they are not what limits
a stream there).

What a stream grew returns to the budget as the credit its shrinking withholds is withheld
(:meth:`WindowTuner.withheld`), and once the stream can receive nothing more (its peer ended
it, or it was reset or closed). Only a window's part above ``initial_window`` is ever charged to
the budget. Worst-case receive memory of a link is therefore
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
SHORTEST_ROUND_TRIP_TO_CUT = 0.005
"""Seconds: a window is cut below ``initial_window`` only on a link whose shortest round trip is
at least this. Below it (loopback, a LAN) the event loops' turns, about a millisecond under
load, would read as a queue, and a window cut to a sub-millisecond path would starve the
stream; there the initial window is never what queues for long anyway."""
FRAME_TIME = 0.010
"""Seconds a DATA frame should take at most to cross a slow path. Behind a frame of 256 KiB (the
default ``max_frame_size``) at 1 MiB/s every other stream's next frame, and a probe's answer,
wait a quarter of a second; so on a link long enough to cut windows on
(:data:`SHORTEST_ROUND_TRIP_TO_CUT`) the receiver asks the sender, with a FRAME_SIZE frame, for
frames of what the path carries in this long (never below :data:`SMALLEST_FRAME_SIZE`): 16 KiB
at 1 MiB/s, 100 KB at 10 MB/s, the default above 25 MB/s, where nothing changes."""
SMALLEST_FRAME_SIZE = 16 * 1024
"""Bytes: the smallest frame size the receiver asks for (a TLS record's worth; the CPU per byte
of smaller frames buys nothing on a path this slow)."""
SMALLEST_WINDOW = 64 * 1024
"""Bytes no window is cut below (nor ``initial_window``, if that is smaller): four credit
batches of 16 KiB, each still a frame large enough to probe with (:data:`PROBE_FRAME_BYTES`)."""


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
        sender cannot use it. A window cut below ``initial_window`` uses
        :meth:`credit_batch_of` instead.
    max_frame_size: bytes, the largest DATA frame this side accepts (its HELLO's): the frame
        size it asks the peer for on a slow path is at most this (0 = never ask).
    """

    __slots__ = (
        "_baseline_pending",
        "_best_rate",
        "_budget_left",
        "_clock",
        "_cut_rate",
        "_frame_size",
        "_frame_size_due",
        "_largest_frame",
        "_min_round_trip",
        "_moved",
        "_quiet_until",
        "_refund",
        "_round",
        "_sent_at",
        "_windows",
        "_withholding",
        "credit_batch",
        "growth_budget",
        "initial_window",
        "max_frame_size",
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
        max_frame_size: int = 0,
    ) -> None:
        if max_window <= initial_window:
            raise ValueError("max_window must be above initial_window for windows to grow")
        if growth_budget < 0:
            raise ValueError("growth_budget cannot be negative")
        self.initial_window = initial_window
        self.max_window = max_window
        self.growth_budget = growth_budget
        self.credit_batch = credit_batch
        self.max_frame_size = max_frame_size
        self._frame_size = max_frame_size  # what the peer was last asked for
        self._frame_size_due: int | None = None  # a FRAME_SIZE to send
        self._budget_left = growth_budget
        self._clock = clock
        self._windows: dict[int, int] = {}  # only streams that grew
        self._withholding: dict[int, int] = {}  # credit a shrink withholds, not yet withheld
        self._refund: dict[int, int] = {}  # the part of it that returns to the budget
        self._best_rate: dict[int, float] = {}  # bytes/s, streams seen in a probe round
        self._cut_rate: dict[int, float] = {}  # bytes/s, the rate a stream's last cut used
        self._moved: dict[int, int] = {}  # bytes per stream in the round in flight
        self._largest_frame = 0  # bytes, the largest DATA frame of the round in flight
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

    def credit_batch_of(self, stream_id: int) -> int:
        """Bytes of consumed credit the receiver may hold back on ``stream_id`` before it
        returns them: ``credit_batch``, or a quarter of a window cut below ``initial_window``."""
        window = self._windows.get(stream_id, self.initial_window)
        if window >= self.initial_window:
            return self.credit_batch
        return max(1, min(self.credit_batch, window // 4))

    @property
    def cuts_below_initial(self) -> bool:
        """Whether this link's path is long enough for windows to be cut below the initial one
        (:data:`SHORTEST_ROUND_TRIP_TO_CUT`)."""
        return SHORTEST_ROUND_TRIP_TO_CUT <= self._min_round_trip < float("inf")

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

    def baseline_written(self) -> None:
        """The baseline probe is being written to the link only now: time it from here, as the
        link's handshake, which came between, is no part of the path's round trip."""
        if self._baseline_pending and self._sent_at is not None:
            self._sent_at = self._clock()

    def _start_round(self, now: float) -> bytes:
        self._round = (self._round + 1) & 0xFFFFFFFF
        self._sent_at = now
        self._moved = {}
        self._largest_frame = 0
        self.probes_sent += 1
        return PROBE_MAGIC + self._round.to_bytes(4, "big")

    def on_data(self, stream_id: int, nbytes: int, received: int) -> bytes | None:
        """``nbytes`` of DATA arrived on ``stream_id``, which has received ``received`` in all.

        Returns the 8-byte payload of a probe PING to send now, or None.
        """
        if self._sent_at is not None:
            moved = self._moved
            moved[stream_id] = moved.get(stream_id, 0) + nbytes
            self._largest_frame = max(self._largest_frame, nbytes)
            return None
        window = self._windows.get(stream_id, self.initial_window)
        if nbytes < PROBE_FRAME_BYTES or received <= window:
            return None
        if (
            stream_id not in self._windows
            and self._budget_left <= 0
            and not self.cuts_below_initial
        ):
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
        largest_frame = self._largest_frame
        self._min_round_trip = min(self._min_round_trip, round_trip)
        if self._baseline_pending:
            self._baseline_pending = False
            return []
        # A loaded link's round trip is at least the idle one plus the time its largest frame
        # takes to cross the path (the answer waits behind it): 13 ms for 64 KiB at 5 MB/s.
        total = sum(moved.values())
        frame_time = largest_frame * round_trip / total if total else 0.0
        unloaded = self._min_round_trip + frame_time
        queued = round_trip > QUEUE_TOLERANCE * unloaded
        if queued:
            changes = self._shrink(moved, round_trip, unloaded)
        elif round_trip > QUEUE_TOLERANCE * self._min_round_trip:
            changes = []  # a queue, or only lumpy frames: too unsure to grow or to cut
        else:
            changes = self._grow(moved, round_trip)
        if total and self.max_frame_size and self.cuts_below_initial:
            self._size_frames(total / round_trip, queued=queued)
        # After a change, wait out the round trip in which it reaches the sender and its bytes
        # come back, so that the next round measures the new window.
        quiet = SETTLE_ROUND_TRIPS if changes else QUIET_ROUND_TRIPS
        self._quiet_until = now + quiet * round_trip
        return changes

    def _size_frames(self, link_rate: float, *, queued: bool) -> None:
        """Ask for frames that cross the path in :data:`FRAME_TIME` at ``link_rate`` (bytes/s).

        Smaller only after a round with a queue (the rate is then the path's, not what the
        application happened to send), larger after any round that moved enough for it (the
        path freed up); and only by a factor of 2 or more, so that the frame is not sent often.
        """
        wanted = max(SMALLEST_FRAME_SIZE, min(self.max_frame_size, int(link_rate * FRAME_TIME)))
        smaller = queued and wanted * 2 <= self._frame_size
        # Back to the full size even when that is less than a doubling.
        larger = wanted >= 2 * self._frame_size or wanted == self.max_frame_size > self._frame_size
        if smaller or larger:
            self._frame_size = self._frame_size_due = wanted

    @property
    def frame_size(self) -> int:
        """Bytes: the largest DATA frame the peer was last asked for (``max_frame_size`` until
        a slow path makes it ask for less)."""
        return self._frame_size

    def take_frame_size(self) -> int | None:
        """The DATA frame size (bytes) to ask the peer for with a FRAME_SIZE frame now, if any."""
        due, self._frame_size_due = self._frame_size_due, None
        return due

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
            # Back up to initial_window is free (a cut window's own allowance), above is budget.
            free = max(0, self.initial_window - window)
            increment = min(window, self.max_window - window, free + self._budget_left)
            if increment <= 0:
                continue
            grown = window + increment
            if grown == self.initial_window:
                del self._windows[stream_id]
            else:
                self._windows[stream_id] = grown
            self._budget_left -= max(0, increment - free)
            self._cut_rate.pop(stream_id, None)
            self.windows_grown += 1
            grants.append((stream_id, increment))
        return grants

    def _shrink(
        self, moved: dict[int, int], round_trip: float, unloaded: float
    ) -> list[tuple[int, int]]:
        """Cut the windows that keep a queue; ``unloaded`` is the round trip (seconds) the link
        would show without one."""
        cuts: list[tuple[int, int]] = []
        initial = self.initial_window
        floor = min(initial, SMALLEST_WINDOW) if self.cuts_below_initial else initial
        for stream_id, nbytes in moved.items():
            window = self._windows.get(stream_id, initial)
            if window <= floor:
                continue  # at its initial window on a short path: the queue is not its own
            if stream_id in self._withholding or nbytes * 2 < window:
                # Still withholding an earlier cut (which starves the sender for a while, so
                # its rate says nothing), or not feeding the queue: cutting again would spiral.
                continue
            # In a round with a queue a window-limited stream has its window in flight, less
            # the credit the receiver holds back: that over the round trip is its rate. What it
            # moved can be up to a frame less, as a slow path's round trip holds only a few.
            in_flight = window - self.credit_batch_of(stream_id)
            rate = max(nbytes, in_flight) / round_trip
            share = rate * self._min_round_trip * SHRINK_HEADROOM
            if share + self.credit_batch >= initial:
                # The batch on top also covers the frame in flight (a default batch, a quarter
                # of 1 MiB, is a default max_frame_size).
                target = int(share) + self.credit_batch
            elif floor == initial:
                target = initial  # a short path: no lower
            else:
                # Below initial_window the batch is a quarter of the window (credit_batch_of),
                # and on a path this slow the frame in flight counts: ``unloaded`` has it. The
                # receiver holds up to a batch and a frame before it returns credit, a third of
                # such a window on average: hence 3/2 (simulated, 1 MB/s x 40 ms: 4/3 filled the
                # path to 90 %, 3/2 to 98 %; 1 MiB/s x 200 ms: 45 ms more queue). A
                # window this small drains its queue in bursts after a cut, so a later round
                # can show a queue at a lower rate than the path's: never cut by a rate below
                # the last cut's, or each cut would go deeper than the one before.
                rate = max(rate, self._cut_rate.get(stream_id, 0.0))
                target = max(floor, int(rate * unloaded * SHRINK_HEADROOM * 3 / 2))
            if target >= window:
                continue
            if target == initial:
                del self._windows[stream_id]
            else:
                self._windows[stream_id] = target
            # The budget comes back as the credit is withheld (withheld()): until then the
            # peer may still send that much.
            self._withholding[stream_id] = window - target
            refund = max(0, window - initial) - max(0, target - initial)
            if refund:
                self._refund[stream_id] = refund
            self._best_rate[stream_id] = self._cut_rate[stream_id] = rate
            self.windows_shrunk += 1
            cuts.append((stream_id, target - window))
        return cuts

    def withheld(self, stream_id: int, nbytes: int) -> None:
        """``nbytes`` of credit a shrink of ``stream_id`` asked for were withheld: the peer can
        no longer send them, so the part that was above ``initial_window`` returns to the
        budget (first: the peer could still send what is not yet withheld)."""
        owed = self._withholding.get(stream_id, 0)
        taken = min(owed, nbytes)  # never more than a cut asked for (a stream forgotten meanwhile)
        if owed > taken:
            self._withholding[stream_id] = owed - taken
        else:
            self._withholding.pop(stream_id, None)
        refund = self._refund.get(stream_id, 0)
        back = min(refund, taken)
        if refund > back:
            self._refund[stream_id] = refund - back
        else:
            self._refund.pop(stream_id, None)
        self._budget_left += back

    def forget(self, stream_id: int) -> None:
        """``stream_id`` receives nothing more: return what it grew to the budget."""
        window = self._windows.pop(stream_id, None)
        if window is not None:
            self._budget_left += max(0, window - self.initial_window)
        self._budget_left += self._refund.pop(stream_id, 0)
        self._withholding.pop(stream_id, None)
        self._best_rate.pop(stream_id, None)
        self._cut_rate.pop(stream_id, None)
        self._moved.pop(stream_id, None)
