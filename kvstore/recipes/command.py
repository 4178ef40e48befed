"""``kvstore lock NAME [--ttl S] [--wait S] -- COMMAND...``: run a command holding a lock.

``kvstore.cli`` registers the subcommand (``add_lock_parser``), splits its
``-- COMMAND...`` off before argparse sees it (``split_lock_command``) and calls
``run_locked``. The command finds the fencing token in ``$KVSTORE_LOCK_TOKEN`` (and
the name in ``$KVSTORE_LOCK_NAME``); the token is also printed on stderr, so the
command's stdout stays its own. The exit code is the command's (128 + N if signal N
ended it, 127 if it could not be started; 1 if ``--wait`` passed without the lock).
"""

from __future__ import annotations

import os
import sys

from kvstore.errors import InvalidArgument

#: The exit code when ``--wait`` passed without the lock (the CLI's "not found").
EXIT_NOT_HELD = 1
#: The exit code when the command cannot be started (as a shell says).
EXIT_CANNOT_RUN = 127
#: The options that take a value before the subcommand's name (``kvstore.cli``).
_GLOBAL_OPTIONS_WITH_VALUE = ("--cluster", "--data", "--timeout")


def add_lock_parser(sub, common):
    """The ``lock`` subcommand on the CLI's subparsers ``sub``; its parser."""
    p = sub.add_parser("lock", parents=[common],
                       help="run a command holding a lock (kvstore.recipes.Lock)",
                       description="Wait for the lock NAME, run COMMAND holding it, release "
                                   "it when COMMAND ends; exit with COMMAND's code. The "
                                   "fencing token (larger at every acquisition) is in "
                                   "$KVSTORE_LOCK_TOKEN and printed on stderr. If this "
                                   "process dies, the lock is free after --ttl seconds.")
    p.add_argument("name", metavar="NAME", help="the lock's name")
    p.add_argument("--ttl", type=float, default=10.0,
                   help="seconds the lock outlives this process if it dies (default 10)")
    p.add_argument("--wait", type=float, default=None, metavar="S",
                   help="give up (exit 1) if the lock is not ours within S seconds "
                        "(default: wait as long as it takes)")
    p.add_argument("argv", nargs="*", metavar="-- COMMAND...",
                   help="the command and its arguments")
    return p


def split_lock_command(argv: list) -> tuple[list, list | None]:
    """``(the CLI's own arguments, COMMAND)`` of ``kvstore ... lock NAME ... -- COMMAND...``;
    COMMAND is None for any other command line (a ``--`` elsewhere is argparse's)."""
    at = 0
    while at < len(argv) and argv[at].startswith("-"):  # options before the command
        at += 2 if argv[at] in _GLOBAL_OPTIONS_WITH_VALUE else 1
    if at < len(argv) and argv[at] == "lock" and "--" in argv[at:]:
        cut = argv.index("--", at)
        return argv[:cut], argv[cut + 1:]
    return argv, None


def run_locked(db, name: str, ttl: float, wait: float | None, argv: list) -> int:
    """Run ``argv`` holding the lock ``name`` on ``db``; its exit code."""
    import signal
    import subprocess

    from kvstore.recipes import Lock
    if not argv:
        raise InvalidArgument("lock needs a command to run: kvstore lock NAME -- COMMAND...")
    lock = Lock(db, name, ttl=ttl)
    if not lock.acquire(timeout=wait):
        print(f"kvstore: lock {name} is still held by another after {wait:g} s",
              file=sys.stderr)
        return EXIT_NOT_HELD
    try:
        print(f"kvstore: holding lock {name}, token {lock.token}", file=sys.stderr)
        env = dict(os.environ, KVSTORE_LOCK_TOKEN=str(lock.token), KVSTORE_LOCK_NAME=name)
        try:
            child = subprocess.Popen(argv, env=env)
        except OSError as e:
            print(f"kvstore: cannot run {argv[0]}: {e.strerror or e}", file=sys.stderr)
            return EXIT_CANNOT_RUN
        forward = lambda signum, _frame: child.send_signal(signum)  # noqa: E731
        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGHUP)}
        try:
            while True:
                try:
                    code = child.wait()
                    break
                except KeyboardInterrupt:  # the terminal's Ctrl-C reached the child too
                    continue
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return code if code >= 0 else 128 - code
    finally:
        lock.release()
