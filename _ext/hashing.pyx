# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of kvstore/_native/hashing_py.py: xxHash64 and jump consistent hashing.

xxHash64 is written here from its specification; jump consistent hashing is
Lamping and Veach (2014). ``shard_of`` is one call on the hot path of every
write, so it reads an exact ``bytes`` object's buffer directly and never
allocates; other buffer types are copied to bytes first.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_CheckExact

cdef uint64_t P1 = 0x9E3779B185EBCA87ULL
cdef uint64_t P2 = 0xC2B2AE3D27D4EB4FULL
cdef uint64_t P3 = 0x165667B19E3779F9ULL
cdef uint64_t P4 = 0x85EBCA77C2B2AE63ULL
cdef uint64_t P5 = 0x27D4EB2F165667C5ULL


cdef inline uint64_t rotl(uint64_t x, int r) noexcept nogil:
    return (x << r) | (x >> (64 - r))


cdef inline uint64_t read64(const uint8_t *p) noexcept nogil:
    # Little-endian load, whatever the host's byte order.
    return (<uint64_t>p[0] | (<uint64_t>p[1] << 8) | (<uint64_t>p[2] << 16) |
            (<uint64_t>p[3] << 24) | (<uint64_t>p[4] << 32) | (<uint64_t>p[5] << 40) |
            (<uint64_t>p[6] << 48) | (<uint64_t>p[7] << 56))


cdef inline uint64_t read32(const uint8_t *p) noexcept nogil:
    return (<uint64_t>p[0] | (<uint64_t>p[1] << 8) | (<uint64_t>p[2] << 16) |
            (<uint64_t>p[3] << 24))


cdef inline uint64_t xround(uint64_t acc, uint64_t lane) noexcept nogil:
    acc = acc + lane * P2
    acc = rotl(acc, 31)
    return acc * P1


cdef inline uint64_t merge(uint64_t acc, uint64_t val) noexcept nogil:
    acc = acc ^ xround(0, val)
    return acc * P1 + P4


cdef uint64_t xxh64_c(const uint8_t *p, Py_ssize_t n, uint64_t seed) noexcept nogil:
    cdef const uint8_t *end = p + n
    cdef const uint8_t *limit
    cdef uint64_t v1, v2, v3, v4, h
    if n >= 32:
        v1 = seed + P1 + P2
        v2 = seed + P2
        v3 = seed
        v4 = seed - P1
        limit = end - 32
        while p <= limit:
            v1 = xround(v1, read64(p))
            v2 = xround(v2, read64(p + 8))
            v3 = xround(v3, read64(p + 16))
            v4 = xround(v4, read64(p + 24))
            p += 32
        h = rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18)
        h = merge(h, v1)
        h = merge(h, v2)
        h = merge(h, v3)
        h = merge(h, v4)
    else:
        h = seed + P5
    h += <uint64_t>n
    while p + 8 <= end:
        h ^= xround(0, read64(p))
        h = rotl(h, 27) * P1 + P4
        p += 8
    if p + 4 <= end:
        h ^= read32(p) * P1
        h = rotl(h, 23) * P2 + P3
        p += 4
    while p < end:
        h ^= (<uint64_t>p[0]) * P5
        h = rotl(h, 11) * P1
        p += 1
    h ^= h >> 33
    h *= P2
    h ^= h >> 29
    h *= P3
    h ^= h >> 32
    return h


cdef inline int64_t jump_c(uint64_t key, int64_t num_buckets) noexcept nogil:
    cdef int64_t b = -1, j = 0
    while j < num_buckets:
        b = j
        key = key * 2862933555777941757ULL + 1
        j = <int64_t>((b + 1) * (<double>(1LL << 31) / <double>((key >> 33) + 1)))
    return b


cdef inline uint64_t hash_object(object data, uint64_t seed) except? 0:
    if not PyBytes_CheckExact(data):
        data = bytes(data)
    return xxh64_c(<const uint8_t *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), seed)


def xxh64(data, seed=0):
    """The XXH64 digest of ``data`` as an unsigned 64-bit int."""
    cdef uint64_t s = <uint64_t>(int(seed) & 0xFFFFFFFFFFFFFFFF)
    return hash_object(data, s)


def jump_consistent_hash(key, num_buckets):
    """Bucket in ``[0, num_buckets)`` for a 64-bit ``key``; moves 1/n of keys when n grows."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    return jump_c(<uint64_t>(int(key) & 0xFFFFFFFFFFFFFFFF), num_buckets)


def shard_of(key, Py_ssize_t nshards):
    """The shard that owns ``key``: jump(xxh64(key), nshards)."""
    if nshards < 1:
        raise ValueError(f"num_buckets must be >= 1, got {nshards}")
    if PyBytes_CheckExact(key):
        return jump_c(xxh64_c(<const uint8_t *>PyBytes_AS_STRING(key),
                              PyBytes_GET_SIZE(key), 0), nshards)
    return jump_c(hash_object(key, 0), nshards)


def shard_of_many(keys, Py_ssize_t nshards):
    """``shard_of`` for each key, in order: one call for a whole batch."""
    if nshards < 1:
        raise ValueError(f"num_buckets must be >= 1, got {nshards}")
    cdef list out = []
    cdef object key
    for key in keys:
        if PyBytes_CheckExact(key):
            out.append(jump_c(xxh64_c(<const uint8_t *>PyBytes_AS_STRING(key),
                                      PyBytes_GET_SIZE(key), 0), nshards))
        else:
            out.append(jump_c(hash_object(key, 0), nshards))
    return out
