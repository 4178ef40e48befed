"""What the simulators keep of a run to explain a failure: the last events, and the report."""

from __future__ import annotations

from collections import deque


class Trace:
    """The last ``lines`` events of a run; with ``verbose`` every event is printed as it happens."""

    def __init__(self, lines: int, verbose: bool) -> None:
        self.events: deque = deque(maxlen=lines)
        self.verbose = verbose

    def add(self, tick: int, line: str) -> None:
        line = f"t{tick} {line}"
        self.events.append(line)
        if self.verbose:
            print(line)

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self):
        return iter(self.events)


def failure_report(title: str, error: BaseException, expected: type, reproduce: str, trace: Trace) -> str:
    """``FAILED <title>: <why>``, the command that replays the seed, then the last events.

    An ``expected`` failure (a check that caught something) is named by its message alone;
    anything else (a crash of the code under test) by its type too.
    """
    kind = "" if isinstance(error, expected) else f"{type(error).__name__}: "
    lines = [f"FAILED {title}: {kind}{error}", f"reproduce: {reproduce}", f"last {len(trace)} events:"]
    lines.extend("  " + event for event in trace)
    return "\n".join(lines)
