/* The lab guest's memory checker (started by guest_init.sh; built static by labkit/image.py).
 *
 * In the spirit of QEMU's tests/qtest/migration-test.c: a region of MIB MiB whose 4 KiB pages each carry
 * a magic, their index, a generation and a checksum over the whole page (the rest is a pattern drawn from
 * index and generation). Passes run over the region forever: pass g verifies that page n holds exactly
 * generation g-1 (the one this loop wrote last) with its own index and a valid checksum, then rewrites it
 * as generation g. A page that went back to an older generation with a valid checksum is stale: memory
 * that a migration failed to send again after the guest changed it. The pages are rewritten at RATE MiB/s
 * (in 64 KiB batches, never in catch-up bursts), so the checker barely changes the guest's dirtying.
 *
 * Output, one line per write(2) on stdout (the serial console):
 *   KSA-MEM start pages=<n> mib_s=<rate> page0=0x<guest-physical> page1=0x<guest-physical>
 *   KSA-MEM ok <pages checked so far>                   every EVERY seconds while nothing was wrong
 *   KSA-MEM STALE page=<n> want=<gen> got=<gen>        a consistent page of another generation
 *   KSA-MEM BAD page=<n> want=<gen> got=<gen> what=<checksum|index|magic>   a page that is not whole
 *   KSA-MEM FAILED <inconsistent pages> <pages checked>   every EVERY seconds once anything was wrong
 * An inconsistent page is reported (the first 64 of them), counted, and rewritten, and the loop goes on.
 * Usage: ksa-memcheck MIB RATE_MIB_S EVERY_S
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)
#define MAGIC 0x4b53414d454d3031ULL /* "KSAMEM01" */
#define BATCH 16                     /* pages between two looks at the clock */
#define MAX_REPORTS 64

enum { W_MAGIC, W_INDEX, W_GEN, W_SUM, W_DATA };

static uint64_t mix(uint64_t x) { /* splitmix64's finaliser */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static uint64_t checksum(const uint64_t *p) {
    uint64_t h = 0x6a09e667f3bcc908ULL;
    for (int i = 0; i < WORDS; i++)
        if (i != W_SUM) h = mix(h ^ p[i]) + (uint64_t)i;
    return h;
}

static void fill(uint64_t *p, uint64_t index, uint64_t gen) {
    uint64_t x = mix(index * 0x9e3779b97f4a7c15ULL ^ gen);
    p[W_MAGIC] = MAGIC;
    p[W_INDEX] = index;
    p[W_GEN] = gen;
    for (int i = W_DATA; i < WORDS; i++) p[i] = x = mix(x + (uint64_t)i);
    p[W_SUM] = checksum(p);
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof line - 2) n = sizeof line - 2;
    line[n++] = '\n';
    ssize_t ignored = write(1, line, (size_t)n); /* one write: a whole line on the console */
    (void)ignored;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static unsigned long long physical(const void *addr) { /* from /proc/self/pagemap; 0 if unknown */
    uint64_t entry = 0;
    int fd = open("/proc/self/pagemap", O_RDONLY);
    if (fd < 0) return 0;
    off_t off = (off_t)((uintptr_t)addr / PAGE) * 8;
    if (pread(fd, &entry, 8, off) != 8) entry = 0;
    close(fd);
    if (!(entry >> 63)) return 0;
    return (unsigned long long)(entry & ((1ULL << 55) - 1)) * PAGE;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        say("KSA-MEM usage: ksa-memcheck MIB RATE_MIB_S EVERY_S");
        return 2;
    }
    long mib = atol(argv[1]), rate = atol(argv[2]), every = atol(argv[3]);
    if (mib <= 0 || rate <= 0 || every <= 0) {
        say("KSA-MEM usage: MIB, RATE_MIB_S and EVERY_S must be > 0");
        return 2;
    }
    uint64_t pages = (uint64_t)mib * (1024 * 1024 / PAGE);
    size_t size = (size_t)pages * PAGE;
    uint8_t *region = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED) {
        say("KSA-MEM error: mmap of %ld MiB failed", mib);
        return 1;
    }
    madvise(region, size, MADV_NOHUGEPAGE); /* 4 KiB pages that stay put: their addresses are reported */
    for (uint64_t n = 0; n < pages; n++) fill((uint64_t *)(region + n * PAGE), n, 0);
    if (mlock(region, size) != 0) say("KSA-MEM warning: mlock failed");
    say("KSA-MEM start pages=%llu mib_s=%ld page0=0x%llx page1=0x%llx", (unsigned long long)pages, rate,
        physical(region), physical(region + PAGE));

    double per_page = 1.0 / ((double)rate * (1024 * 1024 / PAGE)); /* seconds per page at RATE */
    double t0 = now(), last_report = t0;
    uint64_t done = 0, checked = 0, bad = 0;
    for (uint64_t gen = 1;; gen++) {
        for (uint64_t n = 0; n < pages; n++) {
            uint64_t *p = (uint64_t *)(region + n * PAGE);
            const char *what = NULL;
            if (p[W_MAGIC] != MAGIC)
                what = "magic";
            else if (p[W_INDEX] != n)
                what = "index";
            else if (p[W_SUM] != checksum(p))
                what = "checksum";
            if (what || p[W_GEN] != gen - 1) {
                if (bad++ < MAX_REPORTS) {
                    if (what)
                        say("KSA-MEM BAD page=%llu want=%llu got=%llu what=%s", (unsigned long long)n,
                            (unsigned long long)(gen - 1), (unsigned long long)p[W_GEN], what);
                    else
                        say("KSA-MEM STALE page=%llu want=%llu got=%llu", (unsigned long long)n,
                            (unsigned long long)(gen - 1), (unsigned long long)p[W_GEN]);
                }
            }
            checked++;
            fill(p, n, gen);
            if (++done % BATCH) continue;
            double t = now(), due = t0 + (double)done * per_page;
            if (t - due > 1.0) { /* a second or more behind (paused, throttled): no catch-up burst */
                t0 = t - (double)done * per_page;
                due = t;
            }
            if (t - last_report >= (double)every) {
                last_report = t;
                if (bad)
                    say("KSA-MEM FAILED %llu %llu", (unsigned long long)bad, (unsigned long long)checked);
                else
                    say("KSA-MEM ok %llu", (unsigned long long)checked);
            }
            if (due > t) {
                double wait = due - t;
                struct timespec ts = {(time_t)wait, (long)((wait - (double)(time_t)wait) * 1e9)};
                nanosleep(&ts, NULL);
            }
        }
    }
}
