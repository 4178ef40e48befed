# PYTHON_ARGCOMPLETE_OK  (argcomplete's global completion looks for this line)
"""The ``kvstore`` command: put, get, delete, incr, cas, scan, watch, status, check,
local-cluster, keygen, demo (docs/cli.md).

With ``--cluster ADDRS`` (or ``KVSTORE_CLUSTER``) the commands talk to running
servers; without it they act on the embedded store at ``--data DIR``
(default ``./kvstore-data``), and a write that creates that store says so on stderr.

Exit codes: 0 success; 1 the key was not there (get, delete) or did not hold the
expected value (cas); 2 bad usage or bad input; 3 unavailable or timed out, or
(status) a shard without a leader or quorum; 4 storage error.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from typing import Sequence

import kvstore
from kvstore.errors import InvalidArgument, KVError, LeaseExpired, StorageError, Unavailable
from kvstore.ops.health import quorum_problems  # the rule the gateway and a node judge by too

DEFAULT_DATA = "./kvstore-data"
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_STORAGE = 4


def _arg_bytes(text: str) -> bytes:
    """Command-line text as bytes: UTF-8, keeping undecodable bytes as the shell gave them."""
    return os.fsencode(text)


def _out(data: bytes) -> None:
    sys.stdout.buffer.write(data + b"\n")


#: What --json says about its encoding (the help of get and scan).
JSON_HELP = ("print JSON lines {\"key\": ..., \"value\": ...} with the key and the value in "
             "base64 (RFC 4648, standard alphabet, padded): faithful for any bytes")


def _out_json(key: bytes, value: bytes) -> None:
    """One pair as a JSON line, key and value in base64: round-trips any bytes."""
    pair = {"key": base64.b64encode(key).decode("ascii"),
            "value": base64.b64encode(value).decode("ascii")}
    sys.stdout.buffer.write(json.dumps(pair).encode("ascii") + b"\n")


#: ``put KEY -``: the value is read from stdin.
STDIN_VALUE = "-"


def _read_stdin_value() -> bytes:
    """Stdin to its end, byte for byte, refused (before anything is written) past
    ``MAX_VALUE_SIZE`` without reading more than one byte beyond it."""
    if sys.stdin is None:
        raise InvalidArgument("the value is '-' (read stdin), but this process has no stdin")
    value = sys.stdin.buffer.read(kvstore.MAX_VALUE_SIZE + 1)
    if len(value) > kvstore.MAX_VALUE_SIZE:
        raise InvalidArgument(f"the value on stdin is longer than kvstore.MAX_VALUE_SIZE "
                              f"({kvstore.MAX_VALUE_SIZE} bytes); nothing was written")
    return value


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table (no dependency; readable in any terminal or log)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


#: A replica this many slots behind its shard's commit point is shown as lagging.
LAGGING_SLOTS = 100


def _attention(shard: dict) -> str:
    """The nodes of a shard an operator should know about: recovering (a wiped node that
    does not vote yet), catching up (receiving a snapshot or far behind) or lagging."""
    commit = shard.get("commit_index", 0)
    states = shard.get("states") or {}
    notes = []
    for node, applied in sorted((shard.get("replicas") or {}).items()):
        state = states.get(node, "ok")
        if state != "ok":
            notes.append(f"{node} {state} (applied {applied})")
        elif applied is not None and commit - applied > LAGGING_SLOTS:
            notes.append(f"{node} lagging ({commit - applied} behind)")
    return "; ".join(notes)


def format_status(status: dict) -> str:
    """The ``status`` table: nodes, then shards with leader, commit index and lag."""
    nodes = status.get("nodes", [])
    out = [format_table(
        ["node", "address", "state", "role"],
        [[n.get("id"), n.get("address") or "(embedded)", n.get("state", "?"), n.get("role", "")]
         for n in nodes])]
    rows = []
    for s in status.get("shards", []):
        commit = s.get("commit_index", 0)
        replicas = s.get("replicas") or {}
        lag = max((commit - applied for applied in replicas.values()), default=0)
        leader = s.get("leader") or "(none)"
        rows.append([s.get("shard"), leader, commit, s.get("applied_index", ""),
                     lag, s.get("keys", ""), _attention(s)])
    out.append(format_table(["shard", "leader", "commit", "applied", "lag", "keys", "attention"], rows))
    extra = []
    if "path" in status:
        extra.append(f"data: {status['path']}")
    if "disk_bytes" in status:
        extra.append(f"disk: {status['disk_bytes'] / 1e6:.1f} MB")
    if "implementation" in status:
        extra.append(f"kernels: {status['implementation']}")
    if extra:
        out.append("  ".join(extra))
    return "\n\n".join(out)


#: Commands that only read: on a directory with no store they say so (exit 4)
#: instead of creating an empty store at a mistyped --data.
READ_ONLY_COMMANDS = ("get", "scan", "watch", "status", "check", "member")


def _open(args) -> kvstore.KV:
    cluster = args.cluster or os.environ.get("KVSTORE_CLUSTER")
    if cluster:
        return kvstore.connect(cluster, timeout=args.timeout)
    if args.command in READ_ONLY_COMMANDS:
        from kvstore.embedded.store import EmbeddedKV
        return EmbeddedKV(args.data, create=False)
    from kvstore.storage.environment import DATA_FILE
    existed = os.path.lexists(os.path.join(args.data, DATA_FILE))
    db = kvstore.open(args.data)
    if not existed:  # a forgotten --cluster must not write to a new local store unnoticed
        print(f"kvstore: no --cluster or KVSTORE_CLUSTER given: created a new embedded store "
              f"in {db.path}", file=sys.stderr)
    return db


def _cmd_put(db, args) -> int:
    value = args.stdin_value if args.value == STDIN_VALUE else _arg_bytes(args.value)
    db.put(_arg_bytes(args.key), value, lease=_lease_id_arg(args.lease), ttl=args.ttl)
    print("OK")
    return 0


def _lease_id_arg(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text, 10)
    except ValueError:
        raise InvalidArgument(f"a lease ID is a decimal integer (as 'kvstore lease grant' "
                              f"prints it), got {text!r}") from None


def _cmd_lease(db, args) -> int:
    """``lease grant TTL`` (prints the id), ``lease keepalive ID`` (until Ctrl-C: exit 0;
    exit 1 once the lease is gone), ``lease revoke ID`` (prints the keys deleted)."""
    import time
    from kvstore.commands import check_ttl
    from kvstore.lease import Lease, new_lease_id
    if args.action == "grant":
        lease_id = new_lease_id()
        db._lease_grant(lease_id, check_ttl(float(args.arg) if _is_number(args.arg) else args.arg))
        print(lease_id)
        return 0
    lease = Lease(db, _lease_id_arg(args.arg), 3 * args.every, keep_alive=False)
    if args.action == "revoke":
        print(lease.revoke())
        return 0
    try:
        while True:
            lease.keepalive()
            time.sleep(args.every)
    except LeaseExpired as e:
        print(f"kvstore: {e}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except KeyboardInterrupt:
        return 0


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _cmd_get(db, args) -> int:
    value = db.get(_arg_bytes(args.key))
    if value is None:
        print(f"kvstore: key not found: {args.key}", file=sys.stderr)
        return EXIT_NOT_FOUND
    if args.json:
        _out_json(_arg_bytes(args.key), value)
    else:
        _out(value)
    return 0


def _cmd_delete(db, args) -> int:
    if db.delete(_arg_bytes(args.key)):
        print("deleted")
        return 0
    print(f"kvstore: key not found: {args.key}", file=sys.stderr)
    return EXIT_NOT_FOUND


def _cmd_incr(db, args) -> int:
    try:
        delta = int(args.delta, 10)
    except ValueError:
        raise InvalidArgument(f"DELTA must be a decimal integer, got {args.delta!r}") from None
    print(db.incr(_arg_bytes(args.key), delta))
    return 0


def _cmd_cas(db, args) -> int:
    """``cas KEY EXPECTED NEW``; ``--absent`` stands for EXPECTED (the key must be absent)
    and ``--delete`` for NEW (delete it), so the positionals left are the ones given."""
    wanted = 2 - args.absent - args.delete
    if len(args.values) != wanted:
        names = ["EXPECTED"] * (not args.absent) + ["NEW"] * (not args.delete)
        raise InvalidArgument(f"cas takes KEY {' '.join(names)}".rstrip()
                              + f" here; got {len(args.values)} value(s) after KEY")
    values = iter(_arg_bytes(v) for v in args.values)
    expected = None if args.absent else next(values)
    new = None if args.delete else next(values)
    if db.cas(_arg_bytes(args.key), expected, new):
        print("OK")
        return 0
    print(f"kvstore: not swapped: {args.key} does not hold the expected value",
          file=sys.stderr)
    return EXIT_NOT_FOUND


def _cmd_scan(db, args) -> int:
    start = None if args.start is None else _arg_bytes(args.start)
    end = None if args.end is None else _arg_bytes(args.end)
    for key, value in db.scan(_arg_bytes(args.prefix), start=start, end=end, limit=args.limit):
        if args.json:
            _out_json(key, value)
        else:
            _out(key + b"\t" + value)
    return 0


def _event_line(event, prev: bool, as_json: bool) -> bytes:
    """One event as a line: ``REVISION<TAB>put|delete<TAB>KEY<TAB>VALUE`` (an empty
    VALUE for a delete; ``--prev`` adds ``<TAB>PREV``), or a JSON object whose key and
    values are base64 (null when absent)."""
    if as_json:
        def b64(b):
            return None if b is None else base64.b64encode(b).decode("ascii")
        out = {"type": event.type, "key": b64(event.key), "value": b64(event.value),
               "revision": event.revision, "shard": event.shard}
        if prev:
            out["prev_value"] = b64(event.prev_value)
        return json.dumps(out).encode("ascii")
    fields = [b"%d" % event.revision, event.type.encode(), event.key, event.value or b""]
    if prev:
        fields.append(event.prev_value or b"")
    return b"\t".join(fields)


def _cmd_watch(db, args) -> int:
    """Print every change under PREFIX as it happens, one line each, until Ctrl-C
    (exit 0) or the history no longer holds ``--from`` (``Compacted``: exit 2)."""
    start = args.from_revision
    if start is not None and start < 1:
        raise InvalidArgument(f"--from must be a revision >= 1, got {start}")
    watch = db.watch(prefix=_arg_bytes(args.prefix), start_revision=start,
                     prev_value=args.prev)
    try:  # Ctrl-C from the moment it says it watches ends it with 0
        print(f"kvstore: watching {args.prefix or 'every key'!r} (Ctrl-C to stop)",
              file=sys.stderr, flush=True)
        while True:
            event = watch.get(timeout=0.5)  # wakes up now and then: Ctrl-C is seen at once
            if event is None:
                if getattr(watch, "closed", False):
                    return 0
                continue
            _out(_event_line(event, args.prev, args.json))
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 0
    finally:
        watch.close()


def _cmd_status(db, args) -> int:
    status = db.status()
    if args.json:
        print(json.dumps(status, indent=2, default=str))
    else:
        print(format_status(status))
    for problem in status.get("problems", []):  # a node whose cluster shape differs
        print(f"kvstore: {problem}", file=sys.stderr)
    unavailable = quorum_problems(status)
    for problem in unavailable:
        print(f"kvstore: {problem}", file=sys.stderr)
    if unavailable:
        return EXIT_UNAVAILABLE
    return EXIT_USAGE if status.get("problems") else 0


def _cmd_check(db, args) -> int:
    if not hasattr(db, "verify"):
        print("kvstore: check runs on an embedded store (--data DIR)", file=sys.stderr)
        return EXIT_USAGE
    result = db.verify()
    print(f"OK: {result['pages']} pages, {result['records']} log records ({result['bytes']} "
          f"bytes) and "
          f"{result['values']} values verified; the state agrees with the log on "
          f"{result['keys_compared']} keys it covers")
    return 0


def _cmd_backup_restore(args) -> int:
    """``backup FILE`` (--cluster, else --data) and ``restore FILE --data DIR``: one line
    of what was done (``kvstore.backup`` does it)."""
    import kvstore.backup as backups
    if args.command == "restore":
        done = backups.restore(args.file, args.data)
        what = f"restored {_rows_text(done['rows'])} into {done['path']}"
    else:
        cluster = args.cluster or os.environ.get("KVSTORE_CLUSTER")
        if cluster:
            done = backups.backup_cluster(cluster, args.file, timeout=args.timeout)
        else:
            done = backups.backup(args.data, args.file)
        what = f"backed up {_rows_text(done['rows'])} to {done['path']} ({done['bytes']} bytes)"
    print(f"OK: {what}, {done['shards']} shard(s)")
    return 0


def _rows_text(rows: list) -> str:
    data, leases = sum(r[0] for r in rows), sum(r[1] for r in rows)
    return f"{data} keys and {leases} lease rows"


def _cmd_lock(db, args) -> int:
    from kvstore.recipes.command import run_locked
    return run_locked(db, args.name, args.ttl, args.wait, args.argv)


def _cmd_demo(args) -> int:
    from kvstore.embedded.demo import run_demo
    return run_demo(args.data if args.data != DEFAULT_DATA else None)


def _cmd_gateway(args) -> int:
    from kvstore.gateway.serve import run
    cluster = args.cluster or os.environ.get("KVSTORE_CLUSTER")
    if not cluster:
        raise InvalidArgument("kvstore gateway serves a cluster: pass --cluster ADDRS "
                              "(or set KVSTORE_CLUSTER)")
    return run(cluster, args.listen, args.timeout, access_log=args.access_log,
               exit_with_stdin=args.exit_with_stdin, max_watches=args.max_watches)


def _add_common_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """--cluster/--data/--timeout, accepted before the command and after it.

    The subcommands' copies default to SUPPRESS, so an option given before the
    command is not overwritten by the subcommand's default.
    """
    def default(value):
        return value if defaults else argparse.SUPPRESS
    parser.add_argument("--cluster", metavar="ADDRS", default=default(None),
                        help="comma-separated server addresses (default: $KVSTORE_CLUSTER; "
                             "without it, act on the embedded store at --data)")
    parser.add_argument("--data", metavar="DIR", default=default(DEFAULT_DATA),
                        help=f"embedded store directory (default {DEFAULT_DATA})")
    parser.add_argument("--timeout", type=float, default=default(5.0),
                        help="seconds to wait for a cluster (default 5)")


def _complete_if_asked() -> None:
    """Shell completion through argcomplete, when the shell asks and it is installed
    (docs/cli.md): it prints the completions and exits. Otherwise nothing happens."""
    if "_ARGCOMPLETE" not in os.environ:  # not completing: spare every call the import
        return
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(build_parser())


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _add_common_options(common, defaults=False)
    parser = argparse.ArgumentParser(
        prog="kvstore", description="A strongly consistent key-value store.")
    parser.add_argument("--version", action="version", version=f"kvstore {kvstore.__version__}")
    _add_common_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("put", parents=[common], help="store a value",
                       description="Store VALUE under KEY; prints OK once it is durable.")
    p.add_argument("key", metavar="KEY",
                   help="the key (as the shell passes it: UTF-8, other bytes kept)")
    p.add_argument("value", metavar="VALUE",
                   help="the value; '-' reads it from stdin to its end, byte for byte (a "
                        "trailing newline is kept)")
    held = p.add_mutually_exclusive_group()
    held.add_argument("--lease", metavar="ID", help="the key lives as long as lease ID "
                      "('kvstore lease grant'); exit 2 if the lease is gone")
    held.add_argument("--ttl", metavar="S", type=float,
                      help="the key lives S seconds (then it is deleted)")
    p.set_defaults(fn=_cmd_put)
    p = sub.add_parser("get", parents=[common], help="print a value (exit 1 if missing)",
                       description="Print the value of KEY and a newline; exit 1 if there "
                                   "is no such key.")
    p.add_argument("key", metavar="KEY", help="the key")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(fn=_cmd_get)
    p = sub.add_parser("delete", parents=[common], help="remove a key (exit 1 if missing)")
    p.add_argument("key")
    p.set_defaults(fn=_cmd_delete)
    p = sub.add_parser("incr", parents=[common],
                       help="add DELTA (default 1) to a decimal integer value (absent: 0); "
                            "print the new value")
    p.add_argument("key")
    p.add_argument("delta", nargs="?", default="1", help="an integer, may be negative")
    p.set_defaults(fn=_cmd_incr)
    p = sub.add_parser("cas", parents=[common],
                       help="set KEY to NEW if it holds EXPECTED (exit 1 if it does not)")
    p.add_argument("key")
    p.add_argument("values", nargs="*", metavar="EXPECTED NEW",
                   help="the value KEY must hold, then its new value")
    p.add_argument("--absent", action="store_true",
                   help="KEY must be absent (instead of EXPECTED)")
    p.add_argument("--delete", action="store_true", help="delete KEY (instead of NEW)")
    p.set_defaults(fn=_cmd_cas)
    p = sub.add_parser("scan", parents=[common], help="list keys and values in key order")
    p.description = "Print KEY<TAB>VALUE lines in key order (--json: JSON lines)."
    p.add_argument("prefix", nargs="?", default="", metavar="PREFIX",
                   help="only keys starting with it")
    p.add_argument("--start", help="first key (inclusive)")
    p.add_argument("--end", help="end key (exclusive)")
    p.add_argument("--limit", type=int, help="at most this many pairs")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(fn=_cmd_scan)
    p = sub.add_parser("watch", parents=[common], help="print every change under a prefix",
                       description="Print each change under PREFIX as it is committed, one "
                                   "line each, in revision order per shard: REVISION, put or "
                                   "delete, KEY, VALUE, tab-separated (--json: JSON lines). "
                                   "Runs until Ctrl-C (exit 0).")
    p.add_argument("prefix", nargs="?", default="", metavar="PREFIX",
                   help="only keys starting with it (default: every key)")
    p.add_argument("--from", dest="from_revision", type=int, metavar="REV",
                   help="start at this revision (default: changes from now on); exit 2 if "
                        "the history no longer holds it")
    p.add_argument("--prev", action="store_true",
                   help="also print each change's previous value")
    p.add_argument("--json", action="store_true",
                   help="print JSON lines {\"type\", \"key\", \"value\", \"revision\", "
                        "\"shard\"} with key and values in base64 (null when absent)")
    p.set_defaults(fn=_cmd_watch)
    p = sub.add_parser("lease", parents=[common], help="grant, keep alive or revoke a lease",
                       description="grant TTL: grant a lease of TTL seconds on every shard "
                                   "and print its ID; keepalive ID: keep it alive until "
                                   "Ctrl-C (exit 1 once it is gone); revoke ID: end it, "
                                   "deleting its keys (prints how many).")
    p.add_argument("action", choices=["grant", "keepalive", "revoke"])
    p.add_argument("arg", metavar="TTL|ID")
    p.add_argument("--every", metavar="S", type=float, default=1.0,
                   help="keepalive: seconds between two keep-alives (default 1; keep it "
                        "under a third of the lease's ttl)")
    p.set_defaults(fn=_cmd_lease)
    p = sub.add_parser("status", parents=[common], help="nodes, shards, leaders, commit indexes",
                       description="Nodes, and per shard its leader, commit index, lag and "
                                   "the nodes to watch (recovering, catching up, lagging). "
                                   "Exit 3 when a shard has no leader or fewer voting nodes "
                                   "answer than a majority; 2 when a node's cluster.toml "
                                   "differs from the others'.")
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.set_defaults(fn=_cmd_status)
    from kvstore.client.members import add_member_parser
    add_member_parser(sub, common)
    p = sub.add_parser("check", parents=[common],
                       help="verify the checksum of every log record (embedded store)")
    p.set_defaults(fn=_cmd_check)
    p = sub.add_parser("backup", parents=[common],
                       help="write a consistent backup of a cluster or an embedded store",
                       description="Write a consistent, checksummed backup of the cluster "
                                   "(--cluster) or of the embedded store at --data (online: "
                                   "another process may have it open and write) to FILE "
                                   "(docs/backup.md). A transaction across shards is wholly "
                                   "in it or wholly absent.")
    p.add_argument("file", metavar="FILE", help="the backup file (written as FILE.tmp, then "
                                                "renamed)")
    p = sub.add_parser("restore", parents=[common],
                       help="seed a new embedded store directory from a backup",
                       description="Restore the backup FILE into --data DIR (new or empty), "
                                   "all or nothing: a truncated or corrupt backup is refused "
                                   "(exit 4) and leaves nothing behind.")
    p.add_argument("file", metavar="FILE", help="a file written by 'kvstore backup'")
    p = sub.add_parser("local-cluster", parents=[common],
                       help="run a cluster of kvstore-server nodes on 127.0.0.1 (foreground)")
    p.description = ("Run NODES kvstore-server processes on 127.0.0.1 in the foreground, "
                     "print how to reach them, restart one that dies; Ctrl-C, SIGTERM or "
                     "SIGHUP stop them all (exit 0). A port that is not free stops it before "
                     "it starts anything, naming the port (exit 2).")
    p.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    p.add_argument("--shards", type=int, default=None,
                   help="number of shards (default 1; 2 with --demo, to show transactions "
                        "across shards)")
    p.add_argument("--dir", help="data, logs and cluster.toml (default: a new temporary dir)")
    p.add_argument("--port-base", type=int, metavar="N",
                   help="node i (from 0) listens for clients on port N+i and for peers on "
                        "N+i+10000 (default: free ports chosen at random)")
    p.add_argument("--demo", action="store_true",
                   help="instead: show the cluster working and failing over, then stop")
    p.set_defaults(fn=None)
    p = sub.add_parser("keygen", parents=[common],
                       help="write CurveZMQ key pairs for a cluster's [security] table")
    p.add_argument("dir", help="the directory to write the keys into")
    p.add_argument("--client", metavar="NAME",
                   help="add one client key pair NAME.key/NAME.key_secret to an existing key "
                        "directory and allow it (clients/NAME.key; remove that file to revoke)")
    p.add_argument("--admin", action="store_true",
                   help="with --client: also let NAME change the membership (admins/NAME.key; "
                        "without it NAME reads, writes and lists the members only)")
    p.set_defaults(fn=None)
    p = sub.add_parser("gateway", parents=[common],
                       help="serve the cluster over HTTP/JSON (docs/gateway.md)",
                       description="Serve the cluster at --cluster (or $KVSTORE_CLUSTER) over "
                                   "HTTP/JSON until SIGINT or SIGTERM; --data does not apply. "
                                   "Routes: docs/gateway.md.")
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="where to serve HTTP (default 127.0.0.1:8080)")
    p.add_argument("--access-log", action="store_true", help="log every request to stdout")
    p.add_argument("--max-watches", type=int, default=None, metavar="N",
                   help="watch streams open at once; more are refused 503 (default 4096)")
    p.add_argument("--exit-with-stdin", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(fn=None)
    from kvstore.recipes.command import add_lock_parser
    add_lock_parser(sub, common).set_defaults(fn=_cmd_lock)
    p = sub.add_parser("demo", parents=[common],
                       help="show the store working: writes, reads, transactions, threads")
    p.set_defaults(fn=None)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, parsed. ``cas``'s flags may stand between its values
    (``cas KEY --absent NEW``): argparse leaves the values after a flag over, and they
    are ``cas``'s; anything left over by another command is an error."""
    parser = build_parser()
    from kvstore.recipes.command import split_lock_command
    argv, command = split_lock_command(list(sys.argv[1:] if argv is None else argv))
    args, extra = parser.parse_known_args(argv)
    if command is not None:  # ``lock NAME [options] -- COMMAND...``
        if args.command != "lock" or args.argv:
            parser.error(f"unrecognized arguments: {' '.join(args.argv + ['--'] + command)}")
        args.argv = command
    if extra and args.command == "cas" and not any(e.startswith("-") for e in extra):
        args.values += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    _complete_if_asked()
    args = parse_args(argv)
    try:
        if args.command == "demo":
            return _cmd_demo(args)
        if args.command == "keygen":
            from kvstore.transport.security import keygen
            for path in keygen(args.dir, client=args.client, admin=args.admin):
                print(path)
            return 0
        if args.command == "gateway":
            return _cmd_gateway(args)
        if args.command in ("backup", "restore"):
            return _cmd_backup_restore(args)
        if args.command == "local-cluster":
            from kvstore.server.local import run_cluster_demo, run_local_cluster
            run = run_cluster_demo if args.demo else run_local_cluster
            shards = args.shards if args.shards is not None else (2 if args.demo else 1)
            return run(args.nodes, shards, args.dir, port_base=args.port_base)
        if getattr(args, "value", None) == STDIN_VALUE:  # read before anything is opened
            args.stdin_value = _read_stdin_value()
        if args.command == "member" and not (args.cluster or os.environ.get("KVSTORE_CLUSTER")):
            raise InvalidArgument("member commands act on a cluster: pass --cluster ADDRS")
        with _open(args) as db:
            code = args.fn(db, args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
        return code
    except BrokenPipeError:
        # The reader went away (`kvstore scan | head`): what it read was all it wanted.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the flush at exit does not complain
        os.close(devnull)
        return 0
    except KeyboardInterrupt:
        print("kvstore: interrupted", file=sys.stderr)
        return 130
    except InvalidArgument as e:
        print(f"kvstore: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Unavailable as e:
        print(f"kvstore: unavailable: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except StorageError as e:
        print(f"kvstore: storage error: {e}", file=sys.stderr)
        return EXIT_STORAGE
    except OSError as e:  # stdout or stderr refused (a full disk under a redirect, ...)
        print(f"kvstore: storage error: {e}", file=sys.stderr)
        return EXIT_STORAGE
    except KVError as e:
        print(f"kvstore: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # a bug: one line and a failing exit code, not a traceback
        print(f"kvstore: unexpected error (please report it): {type(e).__name__}: {e}",
              file=sys.stderr)
        return EXIT_STORAGE


if __name__ == "__main__":
    sys.exit(main())
