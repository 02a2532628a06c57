// Batched direct-I/O reads with CRC32C for the storage chunk engine (torch_deepstack/storage/fastio.py).
//
// A batch of aligned O_DIRECT reads goes to the kernel through io_uring (native AIO where io_uring is not
// allowed), so the kernel has the batch's full queue depth in flight while Python waits once; then it computes the CRC32C of every
// block read (SSE4.2 and PCLMULQDQ instructions when the CPU has them) and copies unaligned requests out of their bounce
// buffers. Plain C ABI, no dependencies: it builds with the system compiler in well under a second, and
// Python falls back to os.preadv when it cannot be built.
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <immintrin.h>
#include <linux/aio_abi.h>
#include <linux/io_uring.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

extern "C" {

struct ds_io {
    int64_t fd;
    int64_t offset;        // file offset (aligned)
    int64_t length;        // bytes to read (aligned)
    uint64_t buf;          // destination of the read (aligned)
    int64_t valid;         // leading bytes of buf that are chunk data: CRC'd block by block
    int64_t crc_block;     // CRC block size in bytes
    uint64_t crc_out;      // uint32_t[ceil(valid / crc_block)] receives the CRCs
    uint64_t copy_dst;     // if non-zero: copy buf[copy_src_off, +copy_len) here afterwards
    int64_t copy_src_off;
    int64_t copy_len;
    int64_t result;        // out: bytes read, or -errno
};

static uint32_t crc_table[8][256];
static int crc_ready = 0;

static void crc_init() {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++) crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
    crc_ready = 1;
}

static uint32_t crc_sw(const uint8_t* p, size_t n, uint32_t crc) {
    if (!crc_ready) crc_init();
    crc = ~crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        v ^= crc;
        crc = crc_table[7][v & 0xFF] ^ crc_table[6][(v >> 8) & 0xFF] ^ crc_table[5][(v >> 16) & 0xFF] ^
              crc_table[4][(v >> 24) & 0xFF] ^ crc_table[3][(v >> 32) & 0xFF] ^ crc_table[2][(v >> 40) & 0xFF] ^
              crc_table[1][(v >> 48) & 0xFF] ^ crc_table[0][v >> 56];
        p += 8;
        n -= 8;
    }
    while (n--) crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

#if defined(__x86_64__)
// Large buffers: fold 64 bytes per step with carry-less multiplies (four independent 16-byte lanes, PCLMULQDQ),
// then reduce the last 16 bytes with the crc32 instruction. The crc32 instruction alone is one dependent
// chain (~9 GB/s here); folding runs at several times that, which matters for 64 KiB-1 MiB samples that are
// checksummed on every read. Constants: x^e mod P (CRC32C, bit-reflected) for the fold distances, e = 543 /
// 479 (64 bytes: low / high 8 bytes of a lane) and 159 / 95 (16 bytes).
__attribute__((target("sse4.2,pclmul"))) static uint64_t crc_fold(const uint8_t*& p, size_t& n, uint64_t c) {
    const __m128i k64 = _mm_set_epi64x(0x9e4addf8, 0x740eef02);
    const __m128i k16 = _mm_set_epi64x(0x493c7d27, 0xf20c0dfe);
    __m128i x0 = _mm_loadu_si128((const __m128i*)p), x1 = _mm_loadu_si128((const __m128i*)(p + 16));
    __m128i x2 = _mm_loadu_si128((const __m128i*)(p + 32)), x3 = _mm_loadu_si128((const __m128i*)(p + 48));
    x0 = _mm_xor_si128(x0, _mm_cvtsi32_si128((int)(uint32_t)c));
    p += 64;
    n -= 64;
#define DS_FOLD(x, k, next) \
    _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11)), next)
    while (n >= 64) {
        x0 = DS_FOLD(x0, k64, _mm_loadu_si128((const __m128i*)p));
        x1 = DS_FOLD(x1, k64, _mm_loadu_si128((const __m128i*)(p + 16)));
        x2 = DS_FOLD(x2, k64, _mm_loadu_si128((const __m128i*)(p + 32)));
        x3 = DS_FOLD(x3, k64, _mm_loadu_si128((const __m128i*)(p + 48)));
        p += 64;
        n -= 64;
    }
    __m128i x = DS_FOLD(x0, k16, x1);
    x = DS_FOLD(x, k16, x2);
    x = DS_FOLD(x, k16, x3);
    while (n >= 16) {
        x = DS_FOLD(x, k16, _mm_loadu_si128((const __m128i*)p));
        p += 16;
        n -= 16;
    }
#undef DS_FOLD
    c = __builtin_ia32_crc32di(0, (uint64_t)_mm_cvtsi128_si64(x));
    return __builtin_ia32_crc32di(c, (uint64_t)_mm_extract_epi64(x, 1));
}

// The same with 512-bit registers (AVX-512 VPCLMULQDQ: four 64-byte registers, 256 bytes per step), then the
// four registers folded into one by 64-byte distances, leaving the four 16-byte lanes crc_fold ends with.
// Fold constants x^e mod P for 256 bytes: e = 2079 / 2015 (= 256 * 8 + 31 / - 33, as for 64 bytes above).
__attribute__((target("avx512f,vpclmulqdq,sse4.2,pclmul"))) static uint64_t crc_fold512(const uint8_t*& p, size_t& n,
                                                                                       uint64_t c) {
    const __m512i k256 = _mm512_broadcast_i32x4(_mm_set_epi64x(0xb9e02b86, 0xdcb17aa4));
    const __m512i k64 = _mm512_broadcast_i32x4(_mm_set_epi64x(0x9e4addf8, 0x740eef02));
    const __m128i k16 = _mm_set_epi64x(0x493c7d27, 0xf20c0dfe);
    __m512i x0 = _mm512_loadu_si512((const void*)p), x1 = _mm512_loadu_si512((const void*)(p + 64));
    __m512i x2 = _mm512_loadu_si512((const void*)(p + 128)), x3 = _mm512_loadu_si512((const void*)(p + 192));
    x0 = _mm512_xor_si512(x0, _mm512_zextsi128_si512(_mm_cvtsi32_si128((int)(uint32_t)c)));
    p += 256;
    n -= 256;
#define DS_FOLD512(x, k, next) \
    _mm512_xor_si512(_mm512_xor_si512(_mm512_clmulepi64_epi128(x, k, 0x00), _mm512_clmulepi64_epi128(x, k, 0x11)), next)
    while (n >= 256) {
        x0 = DS_FOLD512(x0, k256, _mm512_loadu_si512((const void*)p));
        x1 = DS_FOLD512(x1, k256, _mm512_loadu_si512((const void*)(p + 64)));
        x2 = DS_FOLD512(x2, k256, _mm512_loadu_si512((const void*)(p + 128)));
        x3 = DS_FOLD512(x3, k256, _mm512_loadu_si512((const void*)(p + 192)));
        p += 256;
        n -= 256;
    }
    __m512i x = DS_FOLD512(x0, k64, x1);
    x = DS_FOLD512(x, k64, x2);
    x = DS_FOLD512(x, k64, x3);
#undef DS_FOLD512
#define DS_FOLD(x, k, next) \
    _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11)), next)
    __m128i y = DS_FOLD(_mm512_extracti32x4_epi32(x, 0), k16, _mm512_extracti32x4_epi32(x, 1));
    y = DS_FOLD(y, k16, _mm512_extracti32x4_epi32(x, 2));
    y = DS_FOLD(y, k16, _mm512_extracti32x4_epi32(x, 3));
    while (n >= 16) {
        y = DS_FOLD(y, k16, _mm_loadu_si128((const __m128i*)p));
        p += 16;
        n -= 16;
    }
#undef DS_FOLD
    c = __builtin_ia32_crc32di(0, (uint64_t)_mm_cvtsi128_si64(y));
    return __builtin_ia32_crc32di(c, (uint64_t)_mm_extract_epi64(y, 1));
}

static int crc_wide() {  // AVX-512 with VPCLMULQDQ, unless DEEPSTACK_CRC_AVX512=0
    const char* env = getenv("DEEPSTACK_CRC_AVX512");
    if (env && env[0] == '0') return 0;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vpclmulqdq") ? 1 : 0;
}

__attribute__((target("sse4.2"))) static uint32_t crc_hw(const uint8_t* p, size_t n, uint32_t crc) {
    uint64_t c = ~crc;
    static const int clmul = __builtin_cpu_supports("pclmul") ? 1 : 0;
    static const int wide = crc_wide();
    if (n >= 256 && wide) c = crc_fold512(p, n, c);
    else if (n >= 256 && clmul) c = crc_fold(p, n, c);
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return ~c32;
}
#endif

uint32_t ds_crc32c(const uint8_t* p, uint64_t n, uint32_t crc) {
#if defined(__x86_64__)
    static int hw = -1;
    if (hw < 0) hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    if (hw) return crc_hw(p, n, crc);
#endif
    return crc_sw(p, n, crc);
}

// ---- CRC32C of a concatenation from the CRCs of its parts (no second pass over the bytes) ----
// Polynomials mod P in the bit-reflected form CRC32C uses: a*b mod P, and x^(2^k) mod P for k = 0..31.
static uint32_t mulmodp(uint32_t a, uint32_t b) {
    uint32_t prod = 0;
    for (uint32_t m = 1u << 31; m; m >>= 1) {
        if (a & m) prod ^= b;
        b = (b & 1) ? (b >> 1) ^ 0x82F63B78u : b >> 1;
    }
    return prod;
}

struct ds_crc_combiner {
    uint32_t x2n[32];
    uint32_t page[4][256];  // "advance over 4096 zero bytes" as four byte tables: the common case, 4 lookups
    ds_crc_combiner() {
        uint32_t p = 1u << 30;  // x^1
        for (int k = 0; k < 32; k++) {
            x2n[k] = p;
            p = mulmodp(p, p);
        }
        uint32_t m = shift_const(4096);
        for (int k = 0; k < 4; k++)
            for (int b = 0; b < 256; b++) page[k][b] = mulmodp(m, (uint32_t)b << (8 * k));
    }
    uint32_t shift_const(uint64_t nbytes) const {  // x^(8 * nbytes) mod P
        uint32_t p = 1u << 31;
        uint64_t n = nbytes;
        for (int k = 3; n; n >>= 1, k++)
            if (n & 1) p = mulmodp(x2n[k & 31], p);
        return p;
    }
    // CRC32C of A || B from crc(A), crc(B) and |B| (the pre/post inversions cancel).
    uint32_t combine(uint32_t a, uint32_t b, uint64_t len_b) const {
        if (len_b == 4096)
            return page[0][a & 0xFF] ^ page[1][(a >> 8) & 0xFF] ^ page[2][(a >> 16) & 0xFF] ^ page[3][a >> 24] ^ b;
        return mulmodp(shift_const(len_b), a) ^ b;
    }
};

static const ds_crc_combiner& crc_combiner() {
    static const ds_crc_combiner c;  // thread-safe one-time construction
    return c;
}

uint32_t ds_crc32c_combine(uint32_t a, uint32_t b, uint64_t len_b) { return crc_combiner().combine(a, b, len_b); }

// CRC32C of every `block` bytes of buf (the last block may be short): the chunk engine's per-block checksums.
void ds_block_crcs(const uint8_t* buf, uint64_t len, uint64_t block, uint32_t* out) {
    for (uint64_t pos = 0, i = 0; pos < len; pos += block, i++)
        out[i] = ds_crc32c(buf + pos, len - pos < block ? len - pos : block, 0);
}

uint64_t ds_aio_setup(int depth) {
    aio_context_t ctx = 0;
    if (syscall(SYS_io_setup, depth, &ctx) < 0) return 0;
    return (uint64_t)ctx;
}

void ds_aio_destroy(uint64_t ctx) { syscall(SYS_io_destroy, (aio_context_t)ctx); }

// One native-AIO read request for `io`; `data` comes back in the completion event.
static void fill_read_iocb(struct iocb* cb, const ds_io* io, uint64_t data) {
    memset(cb, 0, sizeof(*cb));
    cb->aio_fildes = (uint32_t)io->fd;
    cb->aio_lio_opcode = IOCB_CMD_PREAD;
    cb->aio_buf = io->buf;
    cb->aio_nbytes = (uint64_t)io->length;
    cb->aio_offset = io->offset;
    cb->aio_data = data;
}

static void finish(ds_io* io) {
    if (io->result < 0) return;
    int64_t valid = io->valid < io->result ? io->valid : io->result;
    uint32_t* out = (uint32_t*)io->crc_out;
    const uint8_t* b = (const uint8_t*)io->buf;
    for (int64_t pos = 0, i = 0; pos < valid; pos += io->crc_block, i++) {
        int64_t n = valid - pos < io->crc_block ? valid - pos : io->crc_block;
        out[i] = ds_crc32c(b + pos, (uint64_t)n, 0);
    }
    if (io->copy_dst) memcpy((void*)io->copy_dst, b + io->copy_src_off, (size_t)io->copy_len);
}

int ds_submit(ds_io* ios, int start, int count, uint64_t ctx_raw);
int ds_reap(int count, uint64_t ctx_raw);

// Returns 0, or -errno when waiting for completions failed (each io's result says how it went). Native AIO in
// waves of `depth` (<= 256): submit a wave, reap it.
int ds_read_batch(ds_io* ios, int n, uint64_t ctx_raw, int depth) {
    if (depth > 256) depth = 256;
    if (n == 1) {  // a lone read: a plain pread has less overhead than an AIO round trip
        ds_io* io = &ios[0];
        ssize_t r;
        do {
            r = pread((int)io->fd, (void*)io->buf, (size_t)io->length, io->offset);
        } while (r < 0 && errno == EINTR);
        io->result = r < 0 ? -errno : r;
        finish(io);
        return 0;
    }
    for (int base = 0; base < n; base += depth) {
        int m = n - base < depth ? n - base : depth;
        int rc = ds_reap(ds_submit(ios, base, m, ctx_raw), ctx_raw);
        if (rc < 0) return rc;
    }
    return 0;
}

// ---- io_uring (preferred: cheaper per request than native AIO), driven with raw syscalls, no liburing ----
struct ds_ring {
    int fd;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe* sqes;
    struct io_uring_cqe* cqes;
    void* sq_ptr;
    void* cq_ptr;
    size_t sq_sz, cq_sz, sqes_sz;
    unsigned entries;
    int defer;  // IORING_SETUP_DEFER_TASKRUN: completions are posted only while this thread is in io_uring_enter
    struct ds_ring* sleeper;  // the DEFER_TASKRUN companion of a plain ring, or nullptr (see ds_ring_setup)
};

static ds_ring* ring_open(unsigned entries, unsigned flags) {
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    p.flags = flags;
    int fd = (int)syscall(__NR_io_uring_setup, entries, &p);
    if (fd < 0) return nullptr;
    ds_ring* r = (ds_ring*)calloc(1, sizeof(ds_ring));
    if (!r) {
        close(fd);
        return nullptr;
    }
    r->fd = fd;
    r->entries = p.sq_entries;
    r->defer = (p.flags & IORING_SETUP_DEFER_TASKRUN) ? 1 : 0;
    r->sq_sz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_sz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    bool single = p.features & IORING_FEAT_SINGLE_MMAP;
    if (single) r->sq_sz = r->cq_sz = (r->sq_sz > r->cq_sz ? r->sq_sz : r->cq_sz);
    r->sq_ptr = mmap(nullptr, r->sq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    r->cq_ptr = single ? r->sq_ptr
                       : mmap(nullptr, r->cq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                              IORING_OFF_CQ_RING);
    r->sqes_sz = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = (struct io_uring_sqe*)mmap(nullptr, r->sqes_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                                         fd, IORING_OFF_SQES);
    if (r->sq_ptr == MAP_FAILED || r->cq_ptr == MAP_FAILED || r->sqes == MAP_FAILED) {
        close(fd);
        free(r);
        return nullptr;
    }
    char* sq = (char*)r->sq_ptr;
    char* cq = (char*)r->cq_ptr;
    r->sq_head = (unsigned*)(sq + p.sq_off.head);
    r->sq_tail = (unsigned*)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned*)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned*)(sq + p.sq_off.array);
    r->cq_head = (unsigned*)(cq + p.cq_off.head);
    r->cq_tail = (unsigned*)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned*)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe*)(cq + p.cq_off.cqes);
    return r;
}

static void ring_close(ds_ring* r) {
    munmap(r->sqes, r->sqes_sz);
    if (r->cq_ptr != r->sq_ptr) munmap(r->cq_ptr, r->cq_sz);
    munmap(r->sq_ptr, r->sq_sz);
    close(r->fd);
    free(r);
}

// A thread's rings (fastio.uring: one pair per thread). The handle is a plain ring, whose completions the kernel
// posts from interrupts: a thread polling for a batch sees them in user space at once. Its companion `sleeper`
// is made with IORING_SETUP_DEFER_TASKRUN (+ SINGLE_ISSUER: only this thread uses it), as fio makes its ring:
// completions are posted only while the thread is inside io_uring_enter, so a thread sleeping for k reads is
// woken once, when all k are in; on the plain ring every completion wakes the sleeper to post it. Batches that
// poll go to the plain ring, batches that sleep to the sleeper (see wait_begin). Kernels before 6.1 refuse the
// flags: then every batch uses the plain ring. DEEPSTACK_URING_DEFER=0 also does that.
uint64_t ds_ring_setup(unsigned entries) {
    ds_ring* r = ring_open(entries, 0);
    if (!r) return 0;
    const char* env = getenv("DEEPSTACK_URING_DEFER");
    if (!(env && env[0] == '0'))
        r->sleeper = ring_open(entries, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN |
                                            IORING_SETUP_COOP_TASKRUN);
    return (uint64_t)r;
}

void ds_ring_destroy(uint64_t h) {
    ds_ring* r = (ds_ring*)h;
    if (r->sleeper) ring_close(r->sleeper);
    ring_close(r);
}

static int ring_enter(ds_ring* r, unsigned submit, unsigned wait, bool getevents = false) {
    for (;;) {
        long ret = syscall(__NR_io_uring_enter, r->fd, submit, wait,
                           (wait || getevents) ? IORING_ENTER_GETEVENTS : 0, nullptr, 0);
        if (ret >= 0) return (int)ret;
        if (errno != EINTR && errno != EAGAIN && errno != EBUSY) return -errno;
        if (errno != EINTR) wait = wait ? wait : 1;  // resources busy: wait for completions, then go on
    }
}

// How many of a batch of `count` reads go to the kernel first, in an io_uring_enter of their own. io_uring plugs a
// submission of more than two requests: the block layer queues them until the whole submission is prepared, and on
// the dev machine's virtio disk (mq-deadline) that preparation costs ~2.5 us per 4 KiB O_DIRECT read (fio's own
// submit latency: 160 us for 64), so the device idled for the first 10-160 us of every batch. A head of count / 4
// reads (1 to 8) starts the device while the rest is prepared: alternating calls on one file (2026-12-01) took
// 6-7% less time per batch at 4 KiB qd 4, 10-12% at qd 16, 8-11% at qd 32, 6-9% at qd 64; no change at 128 KiB
// qd 16 (bandwidth-bound). Submitting the whole batch in chunks of the head's size was no better than one head.
// DEEPSTACK_URING_HEAD=0 turns it off (read per batch, next to a syscall costing microseconds, so a process can
// A/B it in place).
static int submit_head(int count) {
    const char* env = getenv("DEEPSTACK_URING_HEAD");
    if (count <= 2 || (env && env[0] == '0')) return 0;
    int head = count / 4;
    return head < 1 ? 1 : head > 8 ? 8 : head;
}

// Queue ios[start, start+count) and submit them (count <= free SQ slots).
int ds_ring_submit(ds_io* ios, int start, int count, uint64_t h) {
    ds_ring* r = (ds_ring*)h;
    unsigned tail = __atomic_load_n(r->sq_tail, __ATOMIC_RELAXED);
    unsigned mask = *r->sq_mask;
    for (int i = 0; i < count; i++) {
        ds_io* io = &ios[start + i];
        unsigned idx = tail & mask;
        struct io_uring_sqe* sqe = &r->sqes[idx];
        memset(sqe, 0, sizeof(*sqe));
        sqe->opcode = IORING_OP_READ;
        sqe->fd = (int)io->fd;
        sqe->addr = io->buf;
        sqe->len = (unsigned)io->length;
        sqe->off = (uint64_t)io->offset;
        sqe->user_data = (uint64_t)io;  // the completion finds its record by address
        r->sq_array[idx] = idx;
        io->result = -EINPROGRESS;
        tail++;
    }
    __atomic_store_n(r->sq_tail, tail, __ATOMIC_RELEASE);
    int left = count;
    int head = submit_head(count);
    if (head > 0) {
        int n = ring_enter(r, (unsigned)head, 0);
        if (n > 0) left -= n;
    }
    while (left > 0) {
        int n = ring_enter(r, (unsigned)left, 0);
        if (n < 0) {
            for (int i = count - left; i < count; i++) ios[start + i].result = n;
            return count - left;
        }
        left -= n;
    }
    return count;
}

static inline uint64_t now_ns() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

// Waits for `count` completions, finishing each (CRC32C of its blocks, copy-out) as it arrives. While more than
// `tail` reads are outstanding the thread sleeps in the kernel: on a DEFER_TASKRUN ring until all but `tail`
// completed (one wake-up, as fio's batched mode waits), on a plain ring until a quarter of them (at least one)
// did. For the last `tail` it first polls for up to `spin_us` microseconds (hybrid polling: a read that
// completes inside the window costs no sleep/wake-up latency; on a DEFER_TASKRUN ring a poll is an
// io_uring_enter that posts what completed), then sleeps for the rest.
static int reap(ds_ring* r, int count, int spin_us, int tail, int* inflight) {
    int done = 0, polls = 0;
    uint64_t spin_until = 0;
    while (done < count) {
        unsigned head = __atomic_load_n(r->cq_head, __ATOMIC_RELAXED);
        unsigned ctail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
        if (head == ctail) {
            int left = count - done;
            if (spin_us > 0 && left <= tail) {
                if (!spin_until) spin_until = now_ns() + (uint64_t)spin_us * 1000ull;
                if (r->defer) {
                    if (now_ns() < spin_until) {
                        int rc = ring_enter(r, 0, 0, true);
                        if (rc < 0) return rc;
                        continue;
                    }
                } else if ((++polls & 15) || now_ns() < spin_until) {  // read the clock every 16 polls
#if defined(__x86_64__)
                    __builtin_ia32_pause();
#endif
                    continue;
                }
            }
            int want = r->defer ? (left > tail ? left - tail : left) : (left <= tail ? left : (left - tail) / 4);
            if (want < 1) want = 1;
            int rc = ring_enter(r, 0, (unsigned)want);
            if (rc < 0) return rc;
            continue;
        }
        while (head != ctail) {
            struct io_uring_cqe* cqe = &r->cqes[head & *r->cq_mask];
            ds_io* io = (ds_io*)cqe->user_data;
            io->result = cqe->res;
            finish(io);
            head++;
            done++;
            if (inflight) --*inflight;
        }
        __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    }
    return 0;
}

// Which reads of a batch to poll for, and how long (batches read by io_uring on the array path):
// * a thread reading alone (no other thread of the process inside a batched read) polls for the whole batch,
//   the window growing with it (spin_us plus spin_us/8 per read, at most 10x): a synchronous caller waits on
//   the batch's latency and has nothing else to run; on an otherwise idle core polling measured faster than
//   sleeping at small queue depths on this virtio disk (4 KiB qd 1-4: ~1.0 of fio polling, ~0.65-0.7 sleeping,
//   where the Python around each call runs ~3x slower after a sleep: 28-40 us against 11-15 us), level at
//   qd 64; but see wait_begin for a core shared with other work;
// * while other threads read too (an in-process prefetching loader) it polls only for the last REAP_TAIL reads
//   (spin_us plus spin_us/8 per read): polling all of every batch had taken ~40% of PrefetchLoader's CPU at
//   64 KiB (four reader threads polling on 2 cores) for no throughput;
// * a batch of one or two reads of up to 2x spin_us KiB (queue depth 1) also polls through the transfer at
//   ~1 GB/s (1 us per KiB): a 128 KiB read outlasted the base window and paid a wake-up (+25-65% IOPS at
//   128 KiB qd 1 in 3 of 4 interleaved A/B rounds); larger reads keep the base window.
#define REAP_TAIL 2
static int active_readers = 0;  // threads inside a batched read (ds_table_read, ds_waves_wait)

static void poll_plan(int n, int64_t max_read, int spin_us, bool alone, int* window, int* tail) {
    if (spin_us <= 0) {
        *window = 0;
        *tail = REAP_TAIL;
        return;
    }
    if (alone) {
        *tail = n;
        *window = spin_us + spin_us * n / 8;
        if (*window > 10 * spin_us) *window = 10 * spin_us;
    } else {
        *tail = REAP_TAIL;
        *window = spin_us + spin_us * (n < REAP_TAIL ? n : REAP_TAIL) / 8;
    }
    int64_t kib = max_read >> 10;
    if (n <= REAP_TAIL && kib <= 2 * spin_us) *window = spin_us + (int)kib;
}

// Polling pays only while the core is ours: a poller that other runnable tasks preempt (2 cores shared with
// builds and test suites) spends its CPU share spinning and then waits for the CPU when its reads are done,
// where a sleeping waiter is woken at once (a sleeper keeps its scheduling credit). So a batch polls only
// while no more tasks are runnable than there are CPUs (this thread included: the kernel's instantaneous count
// in /proc/loadavg, read at most once per POLL_SAMPLE_NS, ~1 us a read; smoothed, see core_free), and otherwise
// sleeps as fio does.
// Under two CPU hogs (22:45 UTC, 3 rounds, read_array / fio) polling read 0.55 / 0.57 / 0.45 at 4 KiB qd 16 /
// 4 KiB qd 64 / 128 KiB qd 1, sleeping on the DEFER_TASKRUN ring 0.94 / 0.84 / 0.62, at a third of the CPU.
// (Counting preemptions instead fails: kernel workers preempt a poller ~100 times a second even at load 1,
// and a 50 ms sleeping spell after each lost 10-20% at 4 KiB qd 16 under light load.)
#define POLL_SAMPLE_NS 1000000ull
static thread_local uint64_t t_next_sample = 0;
static thread_local bool t_core_free = true;
static thread_local float t_busy_share = 0.0f;
static uint64_t busy_samples = 0;  // samples that found more runnable tasks than CPUs (ds_busy_samples)

uint64_t ds_busy_samples() { return __atomic_load_n(&busy_samples, __ATOMIC_RELAXED); }

// Whether this thread may poll now: fewer runnable tasks than CPUs + 1 at the latest sample.
static bool core_free(uint64_t now) {
    if (now < t_next_sample) return t_core_free;
    t_next_sample = now + POLL_SAMPLE_NS;
    static const long ncpu = sysconf(_SC_NPROCESSORS_ONLN);  // C++ statics: initialised once, thread-safe
    static const int fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
    char buf[128];
    ssize_t len = fd >= 0 ? pread(fd, buf, sizeof(buf) - 1, 0) : -1;
    if (len <= 0) return t_core_free = true;  // no such file: poll as before
    buf[len] = 0;
    const char* p = buf;  // "0.52 0.58 0.59 2/100 5957": the fourth field is runnable/total
    for (int k = 0; k < 3 && p; k++) {
        p = strchr(p, ' ');
        if (p) p++;
    }
    long running = p ? strtol(p, nullptr, 10) : 0;
    bool busy = running > ncpu && ncpu > 0;
    if (busy) __atomic_fetch_add(&busy_samples, 1, __ATOMIC_RELAXED);
    // Smoothed over the last few samples (a kernel worker made runnable for a moment is not contention): the
    // busy share decays by 1/4 per sample, polling stops once it passes 1/2 (three busy samples in a row).
    t_busy_share = t_busy_share * 0.75f + (busy ? 0.25f : 0.0f);
    return t_core_free = t_busy_share < 0.5f;
}

// How one batch waits: on which of the thread's rings it is submitted, and whether it polls (see reap).
struct wait_plan {
    ds_ring* ring;
    int window, tail;
    bool poll;
};

// A batch of n reads (the largest max_read bytes) on the thread's rings r. Pair with wait_end.
static wait_plan wait_begin(ds_ring* r, int n, int64_t max_read, int spin_us) {
    wait_plan w;
    bool alone = __atomic_fetch_add(&active_readers, 1, __ATOMIC_RELAXED) == 0;
    poll_plan(n, max_read, spin_us, alone, &w.window, &w.tail);
    w.poll = w.window > 0 && core_free(now_ns());
    w.ring = w.poll || !r->sleeper ? r : r->sleeper;
    if (!w.poll) w.window = w.tail = 0;
    return w;
}

static int wait_end(const wait_plan& w, int count, int* inflight) {
    int rc = count > 0 ? reap(w.ring, count, w.window, w.tail, inflight) : 0;
    __atomic_fetch_sub(&active_readers, 1, __ATOMIC_RELAXED);
    return rc;
}

// Waits for `count` completions (the general read path's pipeline): polls only for the last REAP_TAIL reads.
int ds_ring_reap(int count, uint64_t h, int spin_us) {
    return reap((ds_ring*)h, count, spin_us, REAP_TAIL, nullptr);
}

// Split form for pipelining (native AIO fallback): submit ios[start, start+count) now (the caller prepares the next wave while
// these are in flight), later reap `count` completions of earlier submissions. At most 256 in flight.
int ds_submit(ds_io* ios, int start, int count, uint64_t ctx_raw) {
    struct iocb cbs[256];
    struct iocb* ptrs[256];
    if (count > 256) return -EINVAL;
    for (int i = 0; i < count; i++) {
        ds_io* io = &ios[start + i];
        fill_read_iocb(&cbs[i], io, (uint64_t)io);
        ptrs[i] = &cbs[i];
        io->result = -EINPROGRESS;
    }
    int submitted = 0;
    while (submitted < count) {
        long r = syscall(SYS_io_submit, (aio_context_t)ctx_raw, (long)(count - submitted), ptrs + submitted);
        if (r < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            int err = errno;
            for (int i = submitted; i < count; i++) ios[start + i].result = -err;
            break;
        }
        submitted += (int)r;
    }
    return submitted;
}

int ds_reap(int count, uint64_t ctx_raw) {
    struct io_event events[256];
    int done = 0;
    while (done < count) {
        long want = count - done < 256 ? count - done : 256;
        long r = syscall(SYS_io_getevents, (aio_context_t)ctx_raw, 1L, want, events, nullptr);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        for (long k = 0; k < r; k++) {
            ds_io* io = (ds_io*)events[k].data;
            io->result = events[k].res;
            finish(io);
        }
        done += (int)r;
    }
    return 0;
}


// ---- whole-batch planning for one call (the array read path, torch_deepstack/storage/array_read.py) ----
// A file's chunk table, built and kept current by Python: per chunk the open fd of its committed version
// (-1: not loaded yet, -2: a hole, -3: not served by this table: the general path reads it), the committed
// length and its page CRCs at crcs[chunk * crc_stride]. `strict` (the cluster's short-circuit tables): a hole
// or a read past the chunk's committed length is not zero-filled but left to the general path, which confirms
// short answers with a second replica.
// A request is one row of 5 int64: file offset, length, offset in the output buffer, result (out), table index.
struct ds_table {
    int64_t file_len;
    int64_t chunk_size;
    int64_t crc_block;
    int64_t nchunks;
    int64_t crc_stride;
    const int64_t* fd;
    const int64_t* vlen;
    const uint32_t* crcs;
    int64_t strict;
};

// Results other than a byte count. SLOW: left to Python's general read path, which retries, re-reads the
// chunk's row and raises the precise error (crossing a chunk, short read, CRC mismatch, I/O error). LOAD: the
// chunk is not in the table yet (Python loads it and calls again). BAD: invalid request (negative offset or
// length, output range outside the buffer, unknown table).
#define DS_SLOW (-1000000)
#define DS_LOAD (-1000001)
#define DS_BAD (-1000002)

// Each thread's page-aligned bounce buffer for unaligned requests; grows, freed when the thread exits.
struct ds_arena {
    uint8_t* p = nullptr;
    size_t cap = 0;
    ~ds_arena() { free(p); }
    uint8_t* get(size_t need) {
        if (need > cap) {
            void* q = nullptr;
            size_t want = need < (1u << 20) ? (1u << 20) : need;
            if (posix_memalign(&q, 4096, want) != 0) return nullptr;
            free(p);
            p = (uint8_t*)q;
            cap = want;
        }
        return p;
    }
};
static thread_local ds_arena tls_arena;

static int run_ios(ds_io* ios, int m, uint64_t ring, uint64_t aio_ctx, int spin_us) {
    if (m == 0) return 0;
    if (!ring) return ds_read_batch(ios, m, aio_ctx, 256);
    for (int base = 0; base < m; base += 256) {  // the ring has 256 submission entries
        int k = m - base < 256 ? m - base : 256;
        int64_t max_read = 0;
        for (int j = base; j < base + k; j++)
            if (ios[j].length > max_read) max_read = ios[j].length;
        wait_plan w = wait_begin((ds_ring*)ring, k, max_read, spin_us);
        int got = ds_ring_submit(ios, base, k, (uint64_t)w.ring);
        int rc = wait_end(w, got, nullptr);
        if (rc < 0) return rc;
    }
    return 0;
}

// One planned batch of table reads (a "wave"): its I/O records and what verifying them needs.
struct ds_wave {
    ds_io* ios;
    int64_t* owner;            // request index per io; negative (-1 - i): no CRC for free
    const uint32_t** expect;   // the table's page CRCs each io must match
    uint32_t* got_crcs;        // the CRCs each io's blocks gave
    uint8_t* bounce;           // own bounce buffer (waves in flight together), or nullptr (the thread's arena)
    int m;                     // ios planned
    int64_t* req;
    int64_t n;
    int64_t* req_crc;
    int64_t left;              // requests not completed by planning (DS_SLOW / DS_LOAD / DS_BAD)
    ds_wave* next;
};

static void wave_free(ds_wave* w) {
    if (!w) return;
    free(w->ios); free(w->owner); free(w->expect); free(w->got_crcs); free(w->bounce);
    free(w);
}

// Plans n requests (see ds_table_read): fills w's ios, marks requests that planning alone settles. own_bounce:
// unaligned requests get a bounce buffer of their own instead of the thread's arena. Returns 0 or -ENOMEM.
static int plan_wave(ds_wave* w, const ds_table* const* tables, int64_t ntables, int64_t* req, int64_t n,
                     uint64_t out, int64_t out_size, int64_t* req_crc, bool own_bounce) {
    memset(w, 0, sizeof(*w));
    w->req = req;
    w->n = n;
    w->req_crc = req_crc;
    int64_t ncrc_max = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t* q = req + 5 * i;
        int64_t t = q[4];
        int64_t blk = (t >= 0 && t < ntables) ? tables[t]->crc_block : 4096;
        if (q[1] > 0) ncrc_max += q[1] / blk + 2;
    }
    size_t nn = (size_t)(n > 0 ? n : 1);
    w->ios = (ds_io*)malloc(sizeof(ds_io) * nn);
    w->owner = (int64_t*)malloc(sizeof(int64_t) * nn);
    w->expect = (const uint32_t**)malloc(sizeof(uint32_t*) * nn);
    w->got_crcs = (uint32_t*)malloc(sizeof(uint32_t) * (size_t)(ncrc_max > 0 ? ncrc_max : 1));
    if (!w->ios || !w->owner || !w->expect || !w->got_crcs) return -ENOMEM;
    ds_io* ios = w->ios;
    int m = 0;
    int64_t cpos = 0, bpos = 0, left = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t* q = req + 5 * i;
        if (req_crc) req_crc[i] = -1;
        int64_t off = q[0], len = q[1], doff = q[2], t = q[4];
        if (off < 0 || len < 0 || doff < 0 || doff > out_size - len || t < 0 || t >= ntables) {
            q[3] = DS_BAD;
            left++;
            continue;
        }
        q[3] = DS_SLOW;
        const ds_table* tb = tables[t];
        int64_t nf = off + len <= tb->file_len ? len : (tb->file_len > off ? tb->file_len - off : 0);
        if (nf == 0) {
            q[3] = 0;
            continue;
        }
        int64_t cs = tb->chunk_size, blk = tb->crc_block;
        int64_t idx = off / cs, inc = off % cs;
        if (inc + nf > cs || idx >= tb->nchunks) {  // spans chunks: the general path splits it
            left++;
            continue;
        }
        int64_t fd = tb->fd[idx];
        if (fd == -1) {
            q[3] = DS_LOAD;
            left++;
            continue;
        }
        if (fd < -2) {  // not served by this table
            left++;
            continue;
        }
        int64_t vl = fd == -2 ? 0 : tb->vlen[idx];
        int64_t nc = vl - inc < nf ? vl - inc : nf;
        if (nc < 0) nc = 0;
        if (nc < nf && tb->strict) {  // short: the general path decides (another replica may hold more)
            left++;
            continue;
        }
        uint8_t* dest = (uint8_t*)(out + (uint64_t)doff);
        if (nc < nf) memset(dest + nc, 0, (size_t)(nf - nc));  // a hole, or past the chunk's end: zeros
        if (nc == 0) {
            q[3] = nf;
            continue;
        }
        int64_t a0 = inc - inc % blk;
        int64_t a1 = (inc + nc + blk - 1) / blk * blk;
        int64_t end_file = (vl + 4095) / 4096 * 4096;
        if (a1 > end_file) a1 = end_file;
        int64_t valid = (a1 < vl ? a1 : vl) - a0;
        ds_io* io = &ios[m];
        io->fd = fd;
        io->offset = a0;
        io->length = a1 - a0;
        io->valid = valid;
        io->crc_block = blk;
        io->crc_out = (uint64_t)(w->got_crcs + cpos);
        io->result = 0;
        if (inc == a0 && nc == a1 - a0 && ((uint64_t)dest & 4095) == 0) {  // lands in place
            io->buf = (uint64_t)dest;
            io->copy_dst = 0;
            io->copy_src_off = io->copy_len = 0;
        } else {  // through a bounce buffer (its address is added below), copied out once read
            io->buf = (uint64_t)bpos;
            bpos += a1 - a0;
            io->copy_dst = (uint64_t)dest;
            io->copy_src_off = inc - a0;
            io->copy_len = nc;
        }
        w->expect[m] = tb->crcs + idx * tb->crc_stride + a0 / blk;
        w->owner[m] = (inc == a0 && nc == valid && nc == nf) ? i : -1 - i;  // negative: no CRC for free
        cpos += (valid + blk - 1) / blk;
        q[3] = nf;
        m++;
    }
    w->m = m;
    w->left = left;
    if (bpos) {
        uint8_t* arena = nullptr;
        if (own_bounce) {
            void* q = nullptr;
            if (posix_memalign(&q, 4096, (size_t)bpos) == 0) arena = w->bounce = (uint8_t*)q;
        } else {
            arena = tls_arena.get((size_t)bpos);
        }
        if (!arena) return -ENOMEM;
        for (int k = 0; k < m; k++)
            if (ios[k].copy_dst) ios[k].buf += (uint64_t)arena;
    }
    return 0;
}

// After every io of the wave completed: a short read, an I/O error or a CRC mismatch sends the request to the
// general path (DS_SLOW); verified whole-block requests get their CRC32C combined from the block CRCs.
static int64_t verify_wave(ds_wave* w) {
    int64_t left = w->left;
    for (int k = 0; k < w->m; k++) {
        ds_io* io = &w->ios[k];
        int64_t ncrc = (io->valid + io->crc_block - 1) / io->crc_block;
        int64_t own = w->owner[k] >= 0 ? w->owner[k] : -1 - w->owner[k];
        const uint32_t* got = (const uint32_t*)io->crc_out;
        if (io->result < io->valid || memcmp(got, w->expect[k], (size_t)(4 * ncrc)) != 0) {
            w->req[5 * own + 3] = DS_SLOW;
            left++;
        } else if (w->req_crc && w->owner[k] >= 0) {
            const ds_crc_combiner& cc = crc_combiner();
            uint32_t c = got[0];
            for (int64_t j = 1; j < ncrc; j++) {
                int64_t len_j = io->valid - j * io->crc_block;
                c = cc.combine(c, got[j], (uint64_t)(len_j < io->crc_block ? len_j : io->crc_block));
            }
            w->req_crc[own] = c;
        }
    }
    return left;
}

// Plans, reads and verifies n requests in one call (data lands at out + row's output offset). Returns the
// number of requests not completed here (results DS_SLOW / DS_LOAD / DS_BAD), or -errno when waiting for
// completions failed (reads may still be in flight: fatal).
// req_crc (optional, n entries): the CRC32C of each request's bytes where its blocks' checks give it for free
// (the request is exactly the block-aligned range that was read and verified: page-aligned samples), combined
// from the block CRCs without another pass; -1 elsewhere (the caller checksums those itself).
int64_t ds_table_read(const ds_table* const* tables, int64_t ntables, int64_t* req, int64_t n, uint64_t out,
                      int64_t out_size, uint64_t ring, uint64_t aio_ctx, int spin_us, int64_t* req_crc) {
    ds_wave* w = (ds_wave*)malloc(sizeof(ds_wave));
    if (!w) return -ENOMEM;
    int rc = plan_wave(w, tables, ntables, req, n, out, out_size, req_crc, false);
    if (rc == 0) rc = run_ios(w->ios, w->m, ring, aio_ctx, spin_us);
    int64_t left = rc == 0 ? verify_wave(w) : rc;
    wave_free(w);
    return left;
}

// ---- the same in waves: submit a wave, prepare the next while it is in flight, wait for all at the end ----
// batch_read builds its rows in Python (~1 us per request); submitting the first rows early lets the device
// work while Python builds the rest. A handle collects the waves of one batch on one thread's io_uring; nothing
// else may use that ring until ds_waves_wait returned (batch_read is synchronous, so it holds by itself).
struct ds_waves {
    ds_wave* head;
    ds_wave* tail;
    int inflight;      // submitted, not yet reaped
    int64_t max_read;
    int64_t nreads;
    ds_ring* ring;     // the ring of the thread's pair the batch went to (see wait_begin)
};

// Plans a wave of n requests (as ds_table_read) and submits its reads without waiting. handle: 0 for a new
// batch, or what an earlier call returned. Returns the handle (never 0), or 0 when out of memory (nothing of
// this wave was submitted; earlier waves are still in flight: call ds_waves_wait on the old handle).
// The arrays (tables, req, req_crc) and the output must stay valid until ds_waves_wait returned.
uint64_t ds_waves_submit(uint64_t handle, const ds_table* const* tables, int64_t ntables, int64_t* req, int64_t n,
                         uint64_t out, int64_t out_size, uint64_t ring, int64_t* req_crc) {
    ds_waves* h = (ds_waves*)handle;
    if (!h) {
        h = (ds_waves*)calloc(1, sizeof(ds_waves));
        if (!h) return 0;
        ds_ring* rr = (ds_ring*)ring;  // the sleeper while this thread is not polling (see wait_begin)
        h->ring = rr->sleeper && !core_free(now_ns()) ? rr->sleeper : rr;
    }
    ds_wave* w = (ds_wave*)malloc(sizeof(ds_wave));
    if (!w || plan_wave(w, tables, ntables, req, n, out, out_size, req_crc, true) != 0) {
        wave_free(w);
        if (!handle) free(h);
        return 0;
    }
    if (h->tail) h->tail->next = w; else h->head = w;
    h->tail = w;
    ds_ring* r = h->ring;
    for (int base = 0; base < w->m;) {  // at most 256 in flight (the ring's submission entries)
        int room = 256 - h->inflight;
        if (room <= 0) {
            if (reap(r, 1, 0, REAP_TAIL, &h->inflight) < 0) {  // cannot wait: the rest stays unsubmitted, failed
                for (int k = base; k < w->m; k++) w->ios[k].result = -EIO;
                break;
            }
            continue;
        }
        int k = w->m - base < room ? w->m - base : room;
        int got = ds_ring_submit(w->ios, base, k, (uint64_t)r);  // records it could not submit carry -errno
        h->inflight += got;
        for (int j = base; j < base + got; j++)
            if (w->ios[j].length > h->max_read) h->max_read = w->ios[j].length;
        h->nreads += got;
        base += k;
    }
    return (uint64_t)h;
}

// Waits for every wave of the handle, verifies them and frees the handle. Returns the number of requests (over
// all waves) not completed here, as ds_table_read, or -errno when waiting failed (reads may still be in flight:
// fatal; the handle is then kept, never freed under the kernel).
int64_t ds_waves_wait(uint64_t handle, uint64_t ring, int spin_us) {
    ds_waves* h = (ds_waves*)handle;
    if (h->inflight > 0) {
        wait_plan w = wait_begin((ds_ring*)ring, (int)h->nreads, h->max_read, spin_us);
        w.ring = h->ring;  // where the reads are (reap polls or sleeps on either kind of ring)
        int rc = wait_end(w, h->inflight, &h->inflight);
        if (rc < 0) return rc;
    }
    int64_t left = 0;
    for (ds_wave* w = h->head; w;) {
        left += verify_wave(w);
        ds_wave* next = w->next;
        wave_free(w);
        w = next;
    }
    free(h);
    return left;
}

// CRC32C of n byte ranges base[start[i], +len[i]) (a batch of samples' end-to-end checksums in one call).
void ds_crc_many(const uint8_t* base, const int64_t* start, const int64_t* len, int64_t n, uint32_t* out) {
    for (int64_t i = 0; i < n; i++) out[i] = ds_crc32c(base + start[i], (uint64_t)len[i], 0);
}

}  // extern "C"
