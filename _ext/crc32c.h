/* CRC32C (Castagnoli), reflected polynomial 0x82F63B78.
 *
 * Two implementations behind one entry point: the SSE4.2 crc32 instruction
 * where the CPU has it (checked once at run time), and portable
 * slicing-by-8 tables otherwise. The pure-Python twin is in
 * kvstore/_native/logcodec_py.py; tests check all of them agree.
 */
#ifndef KVSTORE_CRC32C_H
#define KVSTORE_CRC32C_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static uint32_t kv_crc_table[8][256];
static int kv_crc_ready = 0;
static int kv_crc_hw = 0;

static void kv_crc32c_init(void) {
    uint32_t i, j, c;
    if (kv_crc_ready) return;
    for (i = 0; i < 256; i++) {
        c = i;
        for (j = 0; j < 8; j++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        kv_crc_table[0][i] = c;
    }
    for (i = 0; i < 256; i++) {
        c = kv_crc_table[0][i];
        for (j = 1; j < 8; j++) {
            c = kv_crc_table[0][c & 0xFF] ^ (c >> 8);
            kv_crc_table[j][i] = c;
        }
    }
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    kv_crc_hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
#endif
    kv_crc_ready = 1;
}

/* Portable: slicing-by-8 over the raw (non-inverted) register. */
static uint32_t kv_crc32c_sw(uint32_t crc, const unsigned char *p, size_t n) {
    while (n && ((uintptr_t)p & 7)) {
        crc = kv_crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
        n--;
    }
    while (n >= 8) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4);
        memcpy(&hi, p + 4, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        lo = __builtin_bswap32(lo);
        hi = __builtin_bswap32(hi);
#endif
        lo ^= crc;
        crc = kv_crc_table[7][lo & 0xFF] ^ kv_crc_table[6][(lo >> 8) & 0xFF] ^
              kv_crc_table[5][(lo >> 16) & 0xFF] ^ kv_crc_table[4][lo >> 24] ^
              kv_crc_table[3][hi & 0xFF] ^ kv_crc_table[2][(hi >> 8) & 0xFF] ^
              kv_crc_table[1][(hi >> 16) & 0xFF] ^ kv_crc_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) crc = kv_crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("sse4.2")))
static uint32_t kv_crc32c_hw(uint32_t crc, const unsigned char *p, size_t n) {
    uint64_t c = crc;
    while (n && ((uintptr_t)p & 7)) {
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
        n--;
    }
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        n -= 8;
    }
    while (n--) c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    return (uint32_t)c;
}
#endif

/* CRC32C of p[0..n) continuing from a previous result `value` (0 to start). */
static uint32_t kv_crc32c(uint32_t value, const unsigned char *p, size_t n) {
    uint32_t crc = value ^ 0xFFFFFFFFu;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (kv_crc_hw) return kv_crc32c_hw(crc, p, n) ^ 0xFFFFFFFFu;
#endif
    return kv_crc32c_sw(crc, p, n) ^ 0xFFFFFFFFu;
}

/* For tests: force the portable path (0) or allow hardware (1). Returns the old mode. */
static int kv_crc32c_set_hw(int allow) {
    int old = kv_crc_hw;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    kv_crc_hw = allow ? (__builtin_cpu_supports("sse4.2") ? 1 : 0) : 0;
#else
    (void)allow;
    kv_crc_hw = 0;
#endif
    return old;
}

#endif
