"""A structural check of LMDB's ``data.mdb``, read with ``pread`` (never through a map).

LMDB's pages carry no checksum. A flipped byte in a page header or a node can make
LMDB read past a page, or make a write that goes through the page land in the wrong
place (an acknowledged write then lost). ``check_tree`` walks the B-trees the newest
meta page describes (the free-page tree, the main table and every named table in it)
and checks what LMDB trusts without checking:

- every page number is inside the used part of the file, and each page says it is
  the page it was reached as, of the kind its parent expects;
- a page's free-space bounds (``lower``/``upper``) and node offsets lie in the page,
  every node fits in it, keys are in order, no flag is one kvstore never writes;
- an overflow page covers the value that points to it;
- depth and page and entry counts agree with the table's record.

Layouts from LMDB's mdb.c (64-bit): a 16-byte page header
``pgno u64, pad u16, flags u16, lower u16, upper u16`` (an overflow page has
``pages u32`` where lower/upper are); a node ``lo u16, hi u16, flags u16, ksize u16``
then the key, then (leaf) the data, of size ``lo | hi << 16`` (8 bytes, an overflow
page number, when ``F_BIGDATA``); a branch node's child is ``lo | hi << 16 | flags << 32``.
"""

from __future__ import annotations

import os
import struct

P_BRANCH, P_LEAF, P_OVERFLOW = 0x01, 0x02, 0x04
F_BIGDATA, F_SUBDATA, F_DUPDATA = 0x01, 0x02, 0x04
P_INVALID = (1 << 64) - 1
PAGE_HEADER = 16
NODE_HEADER = 8

_PAGE = struct.Struct("<QHHHH")
_OVERFLOW_PAGES = struct.Struct("<I")
_NODE = struct.Struct("<HHHH")
_DB = struct.Struct("<IHHQQQQQ")  # MDB_db: pad, flags, depth, branch, leaf, overflow, entries, root
_META_LAST_TXN = struct.Struct("<QQ")


class PageError(Exception):
    """What is wrong, and where (the caller turns it into a StorageError naming the path)."""


MDB_INTEGERKEY = 0x08
#: Page flags that describe a page's state in memory, not its kind.
_STATE_FLAGS = 0x10 | 0x4000 | 0x8000  # P_DIRTY, P_LOOSE, P_KEEP


class _Tree:
    __slots__ = ("name", "flags", "depth", "branch", "leaf", "overflow", "entries", "root")

    def __init__(self, name: str, raw: bytes, flags_allowed: int) -> None:
        (_pad, self.flags, self.depth, self.branch, self.leaf, self.overflow, self.entries,
         self.root) = _DB.unpack_from(raw)
        self.name = name
        if self.flags & ~flags_allowed:
            raise PageError(f"table {name} has flags {self.flags:#x}, which kvstore never sets")


class _Walker:
    def __init__(self, fd: int, page_size: int, last_page: int, max_pages: int | None) -> None:
        self.fd = fd
        self.page_size = page_size
        self.last_page = last_page
        self.budget = max_pages  # pages read at most (None: all)
        self.pages_read = 0

    def read(self, pgno: int, what: str) -> bytes:
        if not 2 <= pgno <= self.last_page:
            raise PageError(f"{what} points to page {pgno}, outside the file's pages "
                            f"2..{self.last_page}")
        if self.budget is not None:
            if self.budget <= 0:
                raise _BudgetSpent
            self.budget -= 1
        self.pages_read += 1
        data = os.pread(self.fd, self.page_size, pgno * self.page_size)
        if len(data) != self.page_size:
            raise PageError(f"page {pgno} ({what}) is past the end of the file")
        return data

    def tree(self, tree: _Tree, on_leaf_node=None) -> None:
        """Walk one B-tree; ``on_leaf_node(key, flags, data)`` for each leaf node."""
        if tree.root == P_INVALID:
            if tree.depth or tree.entries or tree.leaf or tree.branch or tree.overflow:
                raise PageError(f"table {tree.name} is empty but its record counts "
                                f"{tree.entries} entries")
            return
        counts = {"branch": 0, "leaf": 0, "overflow": 0, "entries": 0}
        self._page(tree, tree.root, 1, counts, on_leaf_node, f"the root of {tree.name}")
        got = (counts["branch"], counts["leaf"], counts["overflow"], counts["entries"])
        want = (tree.branch, tree.leaf, tree.overflow, tree.entries)
        if got != want:
            raise PageError(f"table {tree.name} holds {got[0]} branch, {got[1]} leaf, "
                            f"{got[2]} overflow pages and {got[3]} entries; its record says "
                            f"{want[0]}, {want[1]}, {want[2]} and {want[3]}")

    def _page(self, tree: _Tree, pgno: int, level: int, counts: dict, on_leaf_node,
              what: str) -> None:
        page = self.read(pgno, what)
        number, _pad, flags, lower, upper = _PAGE.unpack_from(page)
        where = f"page {pgno} ({what})"
        if number != pgno:
            raise PageError(f"{where} says it is page {number}")
        kind = flags & ~_STATE_FLAGS
        if level > tree.depth:
            raise PageError(f"{where} is deeper than its table's depth {tree.depth}")
        want = P_LEAF if level == tree.depth else P_BRANCH
        if kind != want:
            raise PageError(f"{where} has flags {flags:#x}, expected a "
                            f"{'leaf' if want == P_LEAF else 'branch'} page")
        size = self.page_size
        if not (PAGE_HEADER <= lower <= upper <= size) or (lower - PAGE_HEADER) % 2:
            raise PageError(f"{where} has corrupt bounds lower={lower} upper={upper}")
        count = (lower - PAGE_HEADER) // 2
        if want == P_BRANCH and count == 0:
            raise PageError(f"{where} is a branch page without nodes")
        integer_keys = tree.flags & MDB_INTEGERKEY
        previous = None
        for i in range(count):
            (offset,) = struct.unpack_from("<H", page, PAGE_HEADER + 2 * i)
            if not (upper <= offset <= size - NODE_HEADER) or offset % 2:
                raise PageError(f"{where}: node {i} at offset {offset}, outside {upper}..{size}")
            lo, hi, node_flags, key_size = _NODE.unpack_from(page, offset)
            key_at = offset + NODE_HEADER
            if key_at + key_size > size:
                raise PageError(f"{where}: node {i} has a {key_size}-byte key past the page")
            key = page[key_at:key_at + key_size]
            if integer_keys:  # the free-page table's keys are native integers
                key = int.from_bytes(key, "little")
            if i > 0 or want == P_LEAF:  # a branch page's first key is never compared
                if previous is not None and key <= previous:
                    raise PageError(f"{where}: keys out of order at node {i}")
                previous = key
            if want == P_BRANCH:
                child = lo | hi << 16 | node_flags << 32
                self._page(tree, child, level + 1, counts, on_leaf_node, f"a child of {pgno}")
                continue
            data_size = lo | hi << 16
            data_at = key_at + key_size
            if node_flags & ~(F_BIGDATA | F_SUBDATA) or node_flags == F_BIGDATA | F_SUBDATA:
                raise PageError(f"{where}: node {i} has flags {node_flags:#x}")
            if node_flags & F_BIGDATA:
                if data_at + 8 > size:
                    raise PageError(f"{where}: node {i} runs past the page")
                (overflow,) = struct.unpack_from("<Q", page, data_at)
                counts["overflow"] += self._overflow(overflow, data_size, f"{where} node {i}")
                data = None
            else:
                if data_at + data_size > size:
                    raise PageError(f"{where}: node {i} has {data_size} bytes of data past the "
                                    f"page")
                data = page[data_at:data_at + data_size]
            counts["entries"] += 1
            if on_leaf_node is not None:
                on_leaf_node(key, node_flags, data)
        counts["leaf" if want == P_LEAF else "branch"] += 1

    def _overflow(self, pgno: int, data_size: int, what: str) -> int:
        page = self.read(pgno, f"the value of {what}")
        number, _pad, flags = struct.unpack_from("<QHH", page)
        (pages,) = _OVERFLOW_PAGES.unpack_from(page, 12)
        if number != pgno or flags & ~_STATE_FLAGS != P_OVERFLOW:
            raise PageError(f"page {pgno}, the value of {what}, is not its overflow page")
        if pages < 1 or pgno + pages - 1 > self.last_page \
                or pages * self.page_size < PAGE_HEADER + data_size:
            raise PageError(f"overflow page {pgno} ({pages} pages) cannot hold the "
                            f"{data_size}-byte value of {what}")
        return pages


class _BudgetSpent(Exception):
    pass


def check_tree(data_file: str, page_size: int, metas: list[bytes],
               max_pages: int | None = None) -> int:
    """Check the trees of ``data_file`` under its newest meta page; pages read.

    ``metas`` are the two meta pages' bytes. With ``max_pages``, stop quietly after
    reading that many pages (a bounded check at open). Raises ``PageError``.
    """
    newest = max(metas, key=lambda m: _META_LAST_TXN.unpack_from(m, 136)[1])
    last_page, _txn = _META_LAST_TXN.unpack_from(newest, 136)
    free = _Tree("(free pages)", newest[40:88], MDB_INTEGERKEY)
    main = _Tree("(main)", newest[88:136], 0)
    fd = os.open(data_file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        walker = _Walker(fd, page_size, last_page, max_pages)
        tables: list[_Tree] = []

        def named_table(key: bytes, flags: int, data: bytes | None) -> None:
            if flags != F_SUBDATA or data is None or len(data) != _DB.size:
                raise PageError(f"the main table's entry {key!r} is not a table record")
            tables.append(_Tree(key.decode("ascii", "replace"), data, 0))

        try:
            walker.tree(main, named_table)
            for tree in [*tables, free]:
                walker.tree(tree)
        except _BudgetSpent:
            pass
        return walker.pages_read
    finally:
        os.close(fd)
