/*
 * ironclaw vsock test guest: a freestanding x86_64 "kernel" for Firecracker that drives the
 * virtio-mmio vsock device by polling and answers the ironclaw agent protocol's handshake,
 * ping and echo (docs/agent-protocol.md). It exists so that tests can push real bytes through
 * a real, jailed Firecracker on hosts that cannot boot Linux guests.
 *
 * Built at test time by build.py (gcc -ffreestanding, linked at 2 MiB by link.ld).
 *
 * What Firecracker (v1.0 .. v1.14, x86_64) gives us and what we must do ourselves:
 *  - entry in 64-bit mode, interrupts off, only the first GiB identity-mapped, %rsi = the
 *    Linux boot_params; the command line (pointer at +0x228) names the virtio-mmio devices
 *    ("virtio_mmio.device=4K@0xd0000000:5"), which sit above 3 GiB: we map 4 GiB ourselves;
 *  - virtio-mmio version 2: all three queues (rx, tx, event) set up before DRIVER_OK;
 *  - every packet is a chain of two descriptors: 44-byte header, then data;
 *  - the host's credit (buf_alloc, fwd_cnt) bounds what we may send; ours bounds what it sends.
 * We never enable interrupts: the device's are simply not taken, and we poll the used rings.
 * Where the hypervisor emulates each guest instruction (this project's CI host), per-byte
 * work is what costs: copies are single string instructions, and an echo can skip its
 * SHA-256 ("digest":false) so that a 1 MiB round trip takes seconds, not minutes.
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long usize;

#define AGENT_PORT 5252u
#define QN 64u          /* descriptors per queue */
#define NBUF (QN / 2u)  /* two-descriptor chains per queue */
#define BUFSZ 16384u    /* data bytes per rx/tx chain */
#define RING 262144u    /* per-connection receive buffer = the credit we give the host */
#define NCONN 4
#define MAXJSON 4096u
#define MAXPAYLOAD 262144u

/* ------------------------------------------------------------------ basics */
/* This machine's hypervisor may emulate every guest instruction: a string instruction
 * moves a whole buffer for the price of one, so copies use rep movsb / rep stosb. */
void *memset(void *d, int c, usize n) {
    void *r = d;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return r;
}
void *memcpy(void *d, const void *s, usize n) {
    void *r = d;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) :: "memory");
    return r;
}
int memcmp(const void *a, const void *b, usize n) {
    const u8 *p = a, *q = b;
    for (; n; n--, p++, q++) if (*p != *q) return *p - *q;
    return 0;
}
static usize slen(const char *s) { usize n = 0; while (s[n]) n++; return n; }
#define barrier() __asm__ volatile("mfence" ::: "memory")

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static void puts_serial(const char *s) { while (*s) outb(0x3f8, (u8)*s++); }
static char *utoa(u64 v, char *out, int base) {
    char tmp[24]; int n = 0;
    do { tmp[n++] = "0123456789abcdef"[v % (u64)base]; v /= (u64)base; } while (v);
    while (n) *out++ = tmp[--n];
    *out = 0;
    return out;
}
static void reset_machine(void) { outb(0x64, 0xfe); for (;;) __asm__ volatile("hlt"); }
static void die(const char *why) { puts_serial("IRONCLAW-VSOCK-GUEST ERROR "); puts_serial(why); puts_serial("\n"); reset_machine(); }

static inline u32 rd32(u64 a) { return *(volatile u32 *)a; }
static inline void wr32(u64 a, u32 v) { *(volatile u32 *)a = v; }

/* ------------------------------------------------------------------ sha256 */
typedef struct { u32 h[8]; u64 len; u8 buf[64]; u32 n; } sha256;
static const u32 K[64] = {
    0x428a2f98,0x71374491,0xb5c0fbcf,0xe9b5dba5,0x3956c25b,0x59f111f1,0x923f82a4,0xab1c5ed5,
    0xd807aa98,0x12835b01,0x243185be,0x550c7dc3,0x72be5d74,0x80deb1fe,0x9bdc06a7,0xc19bf174,
    0xe49b69c1,0xefbe4786,0x0fc19dc6,0x240ca1cc,0x2de92c6f,0x4a7484aa,0x5cb0a9dc,0x76f988da,
    0x983e5152,0xa831c66d,0xb00327c8,0xbf597fc7,0xc6e00bf3,0xd5a79147,0x06ca6351,0x14292967,
    0x27b70a85,0x2e1b2138,0x4d2c6dfc,0x53380d13,0x650a7354,0x766a0abb,0x81c2c92e,0x92722c85,
    0xa2bfe8a1,0xa81a664b,0xc24b8b70,0xc76c51a3,0xd192e819,0xd6990624,0xf40e3585,0x106aa070,
    0x19a4c116,0x1e376c08,0x2748774c,0x34b0bcb5,0x391c0cb3,0x4ed8aa4a,0x5b9cca4f,0x682e6ff3,
    0x748f82ee,0x78a5636f,0x84c87814,0x8cc70208,0x90befffa,0xa4506ceb,0xbef9a3f7,0xc67178f2};
#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))
static void sha_block(sha256 *s, const u8 *p) {
    u32 w[64], a, b, c, d, e, f, g, h, i;
    for (i = 0; i < 16; i++) w[i] = (u32)p[4*i] << 24 | (u32)p[4*i+1] << 16 | (u32)p[4*i+2] << 8 | p[4*i+3];
    for (i = 16; i < 64; i++) {
        u32 s0 = ROR(w[i-15], 7) ^ ROR(w[i-15], 18) ^ (w[i-15] >> 3);
        u32 s1 = ROR(w[i-2], 17) ^ ROR(w[i-2], 19) ^ (w[i-2] >> 10);
        w[i] = w[i-16] + s0 + w[i-7] + s1;
    }
    a = s->h[0]; b = s->h[1]; c = s->h[2]; d = s->h[3]; e = s->h[4]; f = s->h[5]; g = s->h[6]; h = s->h[7];
    for (i = 0; i < 64; i++) {
        u32 t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        u32 t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    s->h[0] += a; s->h[1] += b; s->h[2] += c; s->h[3] += d; s->h[4] += e; s->h[5] += f; s->h[6] += g; s->h[7] += h;
}
static void sha_init(sha256 *s) {
    static const u32 iv[8] = {0x6a09e667,0xbb67ae85,0x3c6ef372,0xa54ff53a,0x510e527f,0x9b05688c,0x1f83d9ab,0x5be0cd19};
    memcpy(s->h, iv, sizeof iv); s->len = 0; s->n = 0;
}

static void sha_blocks(sha256 *s, const u8 *p, usize nblocks) {
    for (; nblocks; nblocks--, p += 64) sha_block(s, p);
}
static void sha_update(sha256 *s, const u8 *p, usize n) {
    s->len += n;
    if (s->n) {
        usize k = 64 - s->n < n ? 64 - s->n : n;
        memcpy(s->buf + s->n, p, k); s->n += (u32)k; p += k; n -= k;
        if (s->n < 64) return;
        sha_blocks(s, s->buf, 1); s->n = 0;
    }
    if (n >= 64) { sha_blocks(s, p, n / 64); p += n & ~(usize)63; n &= 63; }
    memcpy(s->buf, p, n); s->n = (u32)n;
}
static void sha_hex(sha256 *s, char *out) {
    u64 bits = s->len * 8; u8 pad = 0x80, zero = 0, lenb[8]; int i;
    sha_update(s, &pad, 1);
    while (s->n != 56) sha_update(s, &zero, 1);
    for (i = 0; i < 8; i++) lenb[i] = (u8)(bits >> (56 - 8 * i));
    sha_update(s, lenb, 8);
    for (i = 0; i < 32; i++) {
        u8 byte = (u8)(s->h[i / 4] >> (24 - 8 * (i % 4)));
        out[2*i] = "0123456789abcdef"[byte >> 4]; out[2*i+1] = "0123456789abcdef"[byte & 15];
    }
    out[64] = 0;
}

/* ------------------------------------------------------------------ page tables */
static u64 pml4[512] __attribute__((aligned(4096)));
static u64 pdpt[512] __attribute__((aligned(4096)));
static u64 pds[4][512] __attribute__((aligned(4096)));
static void map_4gib(void) {
    for (u64 g = 0; g < 4; g++) {
        for (u64 i = 0; i < 512; i++) {
            u64 flags = 0x83;                 /* present, writable, 2 MiB page */
            if (g == 3) flags |= 0x18;        /* MMIO window: uncached */
            pds[g][i] = (g << 30) + (i << 21) + flags;
        }
        pdpt[g] = (u64)(usize)pds[g] | 0x3;
    }
    pml4[0] = (u64)(usize)pdpt | 0x3;
    __asm__ volatile("mov %0, %%cr3" :: "r"((u64)(usize)pml4) : "memory");
}

/* ------------------------------------------------------------------ virtqueues */
struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct avail { u16 flags; u16 idx; u16 ring[QN]; u16 used_event; };
struct used_elem { u32 id; u32 len; };
struct used { u16 flags; u16 idx; struct used_elem ring[QN]; u16 avail_event; };
struct vq {
    struct desc desc[QN] __attribute__((aligned(4096)));
    struct avail avail __attribute__((aligned(4096)));
    struct used used __attribute__((aligned(4096)));
    u16 last_used, avail_idx;
};
static struct vq rxq, txq, evq;
struct __attribute__((packed)) hdr {
    u64 src_cid, dst_cid; u32 src_port, dst_port, len; u16 type, op; u32 flags, buf_alloc, fwd_cnt;
};
static struct hdr rx_hdr[NBUF], tx_hdr[NBUF];
static u8 rx_data[NBUF][BUFSZ], tx_data[NBUF][BUFSZ];
static u8 tx_busy[NBUF];
static u32 evbuf[QN];
static u64 mmio;
static u64 guest_cid;

enum { OP_REQUEST = 1, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST };
#define R_STATUS 0x70
#define R_NOTIFY 0x50

static void notify(u32 q) { barrier(); wr32(mmio + R_NOTIFY, q); }
static void vq_push(struct vq *q, u16 head) {
    q->avail.ring[q->avail_idx % QN] = head;
    barrier();
    q->avail.idx = ++q->avail_idx;
}
static void vq_setup(u32 sel, struct vq *q) {
    wr32(mmio + 0x30, sel);
    if (rd32(mmio + 0x34) < QN) die("virtqueue too small");
    wr32(mmio + 0x38, QN);
    wr32(mmio + 0x80, (u32)(usize)q->desc); wr32(mmio + 0x84, 0);
    wr32(mmio + 0x90, (u32)(usize)&q->avail); wr32(mmio + 0x94, 0);
    wr32(mmio + 0xa0, (u32)(usize)&q->used); wr32(mmio + 0xa4, 0);
    wr32(mmio + 0x44, 1);
}

/* ------------------------------------------------------------------ connections */
enum { PH_HDR, PH_JSON, PH_PAYLOAD };
struct conn {
    int used;
    u32 gen;                        /* bumped on reuse: a stale sender notices */
    u32 port;                       /* the host's port */
    u32 peer_buf, peer_fwd, tx_cnt; /* host credit and what we sent */
    u32 fwd_cnt, fwd_told;          /* bytes we consumed, and last told */
    u32 head, tail;                 /* ring positions: received, not yet consumed */
    int phase, hello, echo, echo_payload, digest;
    u32 jlen, left;
    u64 echo_size;
    sha256 sha;
    u8 ring[RING];                  /* last: a new connection clears what is before it */
};
static struct conn conns[NCONN];

static void poll_rx(void);
static void flush_ctl(void);

/* A free tx chain. Firecracker stops taking tx packets while its own rx queue is full, so
 * while we wait we keep taking rx packets (poll_rx only queues replies, never sends). */
static u16 tx_slot(void) {
    for (;;) {
        while (txq.last_used != *(volatile u16 *)&txq.used.idx) {
            barrier();
            tx_busy[txq.used.ring[txq.last_used % QN].id / 2] = 0;
            txq.last_used++;
        }
        for (u16 s = 0; s < NBUF; s++) if (!tx_busy[s]) return s;
        poll_rx();
        __asm__ volatile("pause");
    }
}

/* Control replies decided while taking rx packets, sent later from flush_ctl(). */
static struct { u32 port; u16 op; int conn; } ctlq[128];
static u32 nctl;
static void ctl(u32 port, u16 op, int conn) {
    if (nctl < sizeof ctlq / sizeof ctlq[0]) { ctlq[nctl].port = port; ctlq[nctl].op = op; ctlq[nctl].conn = conn; nctl++; }
}

static void send_pkt(u32 port, u16 op, const u8 *data, u32 n, struct conn *c) {
    u16 s = tx_slot();
    struct hdr *h = &tx_hdr[s];
#ifdef GUEST_DEBUG
    { char b[24]; puts_serial("tx op="); utoa(op, b, 10); puts_serial(b); puts_serial(" len="); utoa(n, b, 10); puts_serial(b); puts_serial("\n"); }
#endif
    memset(h, 0, sizeof *h);
    h->src_cid = guest_cid; h->dst_cid = 2; h->src_port = AGENT_PORT; h->dst_port = port;
    h->len = n; h->type = 1; h->op = op; h->buf_alloc = RING;
    if (c) { h->fwd_cnt = c->fwd_cnt; c->fwd_told = c->fwd_cnt; }
    if (op == OP_SHUTDOWN) h->flags = 3;
    memcpy(tx_data[s], data, n);
    tx_busy[s] = 1;
    struct desc *d = txq.desc;
    d[2*s].addr = (u64)(usize)h; d[2*s].len = sizeof *h; d[2*s].flags = n ? 1 : 0; d[2*s].next = (u16)(2*s + 1);
    d[2*s+1].addr = (u64)(usize)tx_data[s]; d[2*s+1].len = n; d[2*s+1].flags = 0; d[2*s+1].next = 0;
    vq_push(&txq, (u16)(2 * s));
    notify(1);
}

static void drop(struct conn *c) { c->used = 0; }

/* Send bytes on a stream, honouring the host's credit. 0 on success, -1 if the conn died. */
static int conn_send(struct conn *c, const u8 *p, u32 n) {
    int asked = 0;
    u32 gen = c->gen;
    while (n) {
        if (!c->used || c->gen != gen) return -1;
        u32 room = c->peer_buf - (c->tx_cnt - c->peer_fwd);
        if (room == 0) {
            if (!asked) { send_pkt(c->port, OP_CREDIT_REQUEST, 0, 0, c); asked = 1; }
            poll_rx();
            flush_ctl();
            continue;
        }
        asked = 0;
        u32 k = n < room ? n : room;
        if (k > BUFSZ) k = BUFSZ;
        send_pkt(c->port, OP_RW, p, k, c);
        c->tx_cnt += k; p += k; n -= k;
    }
    return 0;
}

static int send_frame(struct conn *c, const char *json, u32 payload) {
    u8 buf[8 + 512];
    u32 j = (u32)slen(json);
    buf[0] = (u8)(j >> 24); buf[1] = (u8)(j >> 16); buf[2] = (u8)(j >> 8); buf[3] = (u8)j;
    buf[4] = (u8)(payload >> 24); buf[5] = (u8)(payload >> 16); buf[6] = (u8)(payload >> 8); buf[7] = (u8)payload;
    memcpy(buf + 8, json, j);
    return conn_send(c, buf, 8 + j);
}

static void fail_conn(struct conn *c, const char *code, const char *msg) {
    char json[256], *p = json;
    const char *parts[] = {"{\"t\":\"error\",\"code\":\"", code, "\",\"message\":\"", msg, "\"}"};
    for (int i = 0; i < 5; i++) { usize l = slen(parts[i]); memcpy(p, parts[i], l); p += l; }
    *p = 0;
    send_frame(c, json, 0);
    if (c->used) send_pkt(c->port, OP_RST, 0, 0, c);
    drop(c);
}

/* ------------------------------------------------------------------ receiving */
static struct conn *find(u32 port) {
    for (int i = 0; i < NCONN; i++) if (conns[i].used && conns[i].port == port) return &conns[i];
    return 0;
}

static void on_packet(struct hdr *h, const u8 *data) {
#ifdef GUEST_DEBUG
    { char b[24]; puts_serial("rx op="); utoa(h->op, b, 10); puts_serial(b); puts_serial(" len="); utoa(h->len, b, 10); puts_serial(b);
      puts_serial(" buf="); utoa(h->buf_alloc, b, 10); puts_serial(b); puts_serial(" fwd="); utoa(h->fwd_cnt, b, 10); puts_serial(b); puts_serial("\n"); }
#endif
    if (h->type != 1 || h->dst_port != AGENT_PORT) {
        if (h->op != OP_RST) ctl(h->src_port, OP_RST, -1);
        return;
    }
    struct conn *c = find(h->src_port);
    if (h->op == OP_REQUEST) {
        if (!c) for (int i = 0; i < NCONN && !c; i++) if (!conns[i].used) c = &conns[i];
        if (!c) { ctl(h->src_port, OP_RST, -1); return; }
        u32 gen = c->gen + 1;
        memset(c, 0, __builtin_offsetof(struct conn, ring));
        c->used = 1; c->port = h->src_port; c->gen = gen;
        c->peer_buf = h->buf_alloc; c->peer_fwd = h->fwd_cnt;
        ctl(c->port, OP_RESPONSE, (int)(c - conns));
        return;
    }
    if (!c) { if (h->op != OP_RST) ctl(h->src_port, OP_RST, -1); return; }
    c->peer_buf = h->buf_alloc; c->peer_fwd = h->fwd_cnt;
    switch (h->op) {
    case OP_RW:
        if (h->len > RING - (c->tail - c->head)) { ctl(c->port, OP_RST, -1); drop(c); return; }
        {
            u32 at = c->tail % RING, first = RING - at < h->len ? RING - at : h->len;
            memcpy(c->ring + at, data, first);
            memcpy(c->ring, data + first, h->len - first);
            c->tail += h->len;
        }
        break;
    case OP_CREDIT_REQUEST: ctl(c->port, OP_CREDIT_UPDATE, (int)(c - conns)); break;
    case OP_SHUTDOWN: ctl(c->port, OP_RST, -1); drop(c); break;
    case OP_RST: drop(c); break;
    default: break;
    }
}

static void flush_ctl(void) {
    for (u32 i = 0; i < nctl; i++) {
        struct conn *c = ctlq[i].conn >= 0 ? &conns[ctlq[i].conn] : 0;
        if (c && (!c->used || c->port != ctlq[i].port)) continue; /* gone meanwhile */
        send_pkt(ctlq[i].port, ctlq[i].op, 0, 0, c);
    }
    nctl = 0;
}

static void poll_rx(void) {
    int reposted = 0;
    while (rxq.last_used != *(volatile u16 *)&rxq.used.idx) {
        barrier();
        u16 head = (u16)rxq.used.ring[rxq.last_used % QN].id;
        rxq.last_used++;
        struct hdr h;
        memcpy(&h, &rx_hdr[head / 2], sizeof h);
        if (h.len > BUFSZ) h.len = BUFSZ;
        on_packet(&h, rx_data[head / 2]);
        vq_push(&rxq, head);
        reposted = 1;
    }
    if (reposted) notify(0);
    int ev = 0;
    while (evq.last_used != *(volatile u16 *)&evq.used.idx) {
        u16 head = (u16)evq.used.ring[evq.last_used % QN].id;
        evq.last_used++;
        if (evbuf[head] == 0) { /* TRANSPORT_RESET (after a snapshot restore): start afresh */
            for (int i = 0; i < NCONN; i++) drop(&conns[i]);
            guest_cid = rd32(mmio + 0x100) | (u64)rd32(mmio + 0x104) << 32;
        }
        vq_push(&evq, head);
        ev = 1;
    }
    if (ev) notify(2);
}

/* ------------------------------------------------------------------ the protocol */
static u32 avail_bytes(struct conn *c) { return c->tail - c->head; }
static void take(struct conn *c, u8 *out, u32 n) {
    u32 at = c->head % RING, first = RING - at < n ? RING - at : n;
    memcpy(out, c->ring + at, first);
    memcpy(out + first, c->ring, n - first);
}
static void consume(struct conn *c, u32 n) {
    c->head += n; c->fwd_cnt += n;
    if (c->fwd_cnt - c->fwd_told >= RING / 4) send_pkt(c->port, OP_CREDIT_UPDATE, 0, 0, c);
}
static int has(const char *json, u32 n, const char *needle) {
    usize l = slen(needle);
    for (u32 i = 0; i + l <= n; i++) if (!memcmp(json + i, needle, l)) return 1;
    return 0;
}
static int offers_v1(const char *json, u32 n) {
    const char *key = "\"versions\":[";
    usize l = slen(key);
    for (u32 i = 0; i + l <= n; i++) {
        if (memcmp(json + i, key, l)) continue;
        for (u32 j = i + (u32)l; j < n && json[j] != ']'; j++) {
            if (json[j] == '1' && (json[j-1] == '[' || json[j-1] == ',') && (json[j+1] == ']' || json[j+1] == ','))
                return 1;
        }
    }
    return 0;
}

static void on_message(struct conn *c, const char *json, u32 n, u32 payload) {
    c->echo_payload = 0;
    if (!c->hello) {
        if (!has(json, n, "\"t\":\"hello\"") || !has(json, n, "\"proto\":\"ironclaw-agent\"")) {
            fail_conn(c, "bad_frame", "expected an ironclaw-agent hello first"); return;
        }
        if (!offers_v1(json, n)) {
            fail_conn(c, "version_mismatch", "the C test guest speaks protocol version [1] only"); return;
        }
        c->hello = 1;
        send_frame(c, "{\"t\":\"hello\",\"proto\":\"ironclaw-agent\",\"versions\":[1],\"role\":\"agent\","
                      "\"version\":1,\"agent\":\"ironclaw-c-guest/1\",\"pid\":0}", 0);
    } else if (c->echo && has(json, n, "\"t\":\"data\"")) {
        c->echo_payload = 1;
        send_frame(c, "{\"t\":\"data\"}", payload);
    } else if (c->echo && has(json, n, "\"t\":\"end\"")) {
        char out[160] = "{\"t\":\"end\",\"size\":", *p = out + slen(out);
        p = utoa(c->echo_size, p, 10);
        if (c->digest) {
            memcpy(p, ",\"sha256\":\"", 11); p += 11;
            sha_hex(&c->sha, p); p += 64;
            *p++ = '"';
        }
        memcpy(p, "}", 2);
        c->echo = 0;
        send_frame(c, out, 0);
    } else if (c->echo) {
        fail_conn(c, "bad_sequence", "expected data or end during echo");
    } else if (has(json, n, "\"t\":\"ping\"")) {
        send_frame(c, "{\"t\":\"pong\",\"agent\":\"ironclaw-c-guest/1\",\"uptime_s\":0.0,\"running\":0}", 0);
    } else if (has(json, n, "\"t\":\"echo\"")) {
        c->echo = 1; c->echo_size = 0; sha_init(&c->sha);
        c->digest = !has(json, n, "\"digest\":false");
        send_frame(c, "{\"t\":\"ready\"}", 0);
    } else {
        send_frame(c, "{\"t\":\"error\",\"code\":\"unknown_request\",\"message\":\"the C test guest "
                      "only answers hello, ping and echo\"}", 0);
    }
}

static void step(struct conn *c) {
    static char json[MAXJSON];
    u8 h8[8], chunk[BUFSZ];
    u32 gen = c->gen;
    while (c->used && c->gen == gen) {
        u32 have = avail_bytes(c);
        if (c->phase == PH_HDR) {
            if (have < 8) return;
            take(c, h8, 8);
            c->jlen = (u32)h8[0] << 24 | (u32)h8[1] << 16 | (u32)h8[2] << 8 | h8[3];
            c->left = (u32)h8[4] << 24 | (u32)h8[5] << 16 | (u32)h8[6] << 8 | h8[7];
            if (c->jlen == 0 || c->jlen > MAXJSON || c->left > MAXPAYLOAD) {
                fail_conn(c, "bad_frame", "frame lengths out of range"); return;
            }
            consume(c, 8);
            if (c->gen != gen) return;
            c->phase = PH_JSON;
        } else if (c->phase == PH_JSON) {
            if (have < c->jlen) return;
            take(c, (u8 *)json, c->jlen);
            consume(c, c->jlen);
            if (c->gen != gen) return;
            c->phase = c->left ? PH_PAYLOAD : PH_HDR;
            on_message(c, json, c->jlen, c->left);
        } else {
            if (!have) return;
            u32 k = have < c->left ? have : c->left;
            if (k > BUFSZ) k = BUFSZ;
            take(c, chunk, k);
            if (c->echo_payload) {
                if (c->digest) sha_update(&c->sha, chunk, k);
                c->echo_size += k;
                if (conn_send(c, chunk, k)) return;
            }
            consume(c, k);
            if (c->gen != gen) return;
            c->left -= k;
            if (!c->left) c->phase = PH_HDR;
        }
    }
}

/* ------------------------------------------------------------------ start */
static u64 find_vsock(const char *cmdline) {
    const char *key = "virtio_mmio.device=";
    usize kl = slen(key);
    for (const char *p = cmdline; *p; p++) {
        if (memcmp(p, key, kl)) continue;
        const char *q = p + kl;
        while (*q && *q != '@' && *q != ' ') q++;
        if (*q != '@' || q[1] != '0' || q[2] != 'x') continue;
        u64 addr = 0;
        for (q += 3; ; q++) {
            u32 d = (*q >= '0' && *q <= '9') ? (u32)(*q - '0') : (*q >= 'a' && *q <= 'f') ? (u32)(*q - 'a' + 10) : 99;
            if (d == 99) break;
            addr = addr * 16 + d;
        }
        if (rd32(addr) == 0x74726976 && rd32(addr + 8) == 19) return addr;
    }
    return 0;
}

void guest_main(u8 *boot_params);
void guest_main(u8 *boot_params) {
    char num[24];
    map_4gib();
    const char *cmdline = (const char *)(usize)*(u32 *)(boot_params + 0x228);
    mmio = find_vsock(cmdline);
    if (!mmio) die("no virtio-mmio vsock device on the kernel command line");
    if (rd32(mmio + 4) != 2) die("virtio-mmio version is not 2");
    wr32(mmio + R_STATUS, 0);
    wr32(mmio + R_STATUS, 1);
    wr32(mmio + R_STATUS, 1 | 2);
    wr32(mmio + 0x24, 1); wr32(mmio + 0x20, 1); /* VIRTIO_F_VERSION_1 (bit 32) */
    wr32(mmio + 0x24, 0); wr32(mmio + 0x20, 0);
    wr32(mmio + R_STATUS, 1 | 2 | 8);
    if (!(rd32(mmio + R_STATUS) & 8)) die("device refused our features");
    guest_cid = rd32(mmio + 0x100) | (u64)rd32(mmio + 0x104) << 32;
    vq_setup(0, &rxq); vq_setup(1, &txq); vq_setup(2, &evq);
    for (u16 i = 0; i < NBUF; i++) {
        rxq.desc[2*i].addr = (u64)(usize)&rx_hdr[i]; rxq.desc[2*i].len = sizeof(struct hdr);
        rxq.desc[2*i].flags = 1 | 2; rxq.desc[2*i].next = (u16)(2*i + 1);
        rxq.desc[2*i+1].addr = (u64)(usize)rx_data[i]; rxq.desc[2*i+1].len = BUFSZ;
        rxq.desc[2*i+1].flags = 2;
        vq_push(&rxq, (u16)(2 * i));
    }
    for (u16 i = 0; i < 8; i++) {
        evq.desc[i].addr = (u64)(usize)&evbuf[i]; evq.desc[i].len = 4; evq.desc[i].flags = 2;
        vq_push(&evq, i);
    }
    wr32(mmio + R_STATUS, 1 | 2 | 8 | 4);
    notify(0); notify(2);
    puts_serial("IRONCLAW-VSOCK-GUEST READY cid=");
    utoa(guest_cid, num, 10); puts_serial(num); puts_serial("\n");
    for (;;) {
        poll_rx();
        flush_ctl();
        for (int i = 0; i < NCONN; i++) if (conns[i].used) step(&conns[i]);
        __asm__ volatile("pause");
    }
}

u8 guest_stack[65536] __attribute__((aligned(16), used));
__asm__(".section .text.entry,\"ax\"\n"
        ".global _start\n"
        "_start:\n"
        "  cli\n"
        "  lea guest_stack+65536(%rip), %rsp\n"
        "  mov %rsi, %rdi\n"
        "  call guest_main\n"
        "1: hlt\n"
        "  jmp 1b\n");
