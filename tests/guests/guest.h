/*
 * What the freestanding test guests share: serial output, reset, 4 GiB identity map, and
 * the virtio-mmio (version 2) basics: finding a device on the command line, negotiating
 * VIRTIO_F_VERSION_1 only, setting up a split virtqueue.
 *
 * Firecracker enters in 64-bit mode with the first GiB identity-mapped and %rsi pointing at
 * the Linux boot_params; the command line (pointer at +0x228) names the virtio-mmio devices
 * ("virtio_mmio.device=4K@0xd0000000:5"), above 3 GiB, so we map 4 GiB with 2 MiB pages.
 * Firecracker wants the device status to advance one bit at a time.
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long usize;

#define QN 16u
#define barrier() __asm__ volatile("mfence" ::: "memory")

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static void say(const char *s) { while (*s) outb(0x3f8, (u8)*s++); }
static void die(const char *why) {
    say("IRONCLAW-GUEST ERROR "); say(why); say("\n");
    outb(0x64, 0xfe); /* i8042 reset: firecracker exits */
    for (;;) __asm__ volatile("hlt");
}
static inline u32 rd32(u64 a) { return *(volatile u32 *)a; }
static inline void wr32(u64 a, u32 v) { *(volatile u32 *)a = v; }

static u64 pml4[512] __attribute__((aligned(4096)));
static u64 pdpt[512] __attribute__((aligned(4096)));
static u64 pds[4][512] __attribute__((aligned(4096)));
static void map_4gib(void) {
    for (u64 g = 0; g < 4; g++) {
        for (u64 i = 0; i < 512; i++)
            pds[g][i] = (g << 30) + (i << 21) + 0x83 + (g == 3 ? 0x18 : 0); /* MMIO uncached */
        pdpt[g] = (u64)(usize)pds[g] | 0x3;
    }
    pml4[0] = (u64)(usize)pdpt | 0x3;
    __asm__ volatile("mov %0, %%cr3" :: "r"((u64)(usize)pml4) : "memory");
}

struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct avail { u16 flags; u16 idx; u16 ring[QN]; u16 used_event; };
struct used { u16 flags; u16 idx; struct { u32 id; u32 len; } ring[QN]; u16 avail_event; };
struct vq {
    struct desc desc[QN] __attribute__((aligned(4096)));
    struct avail avail __attribute__((aligned(4096)));
    struct used used __attribute__((aligned(4096)));
};
static u64 find_device(const char *p, u32 device_id) {
    static const char key[] = "virtio_mmio.device=";
    for (; *p; p++) {
        usize k = 0;
        while (key[k] && p[k] == key[k]) k++;
        if (key[k]) continue;
        const char *q = p + k;
        while (*q && *q != '@' && *q != ' ') q++;
        if (q[0] != '@' || q[1] != '0' || q[2] != 'x') continue;
        u64 addr = 0;
        for (q += 3;; q++) {
            u32 d = (*q >= '0' && *q <= '9') ? (u32)(*q - '0')
                  : (*q >= 'a' && *q <= 'f') ? (u32)(*q - 'a' + 10) : 99;
            if (d == 99) break;
            addr = addr * 16 + d;
        }
        if (rd32(addr) == 0x74726976 && rd32(addr + 8) == device_id) return addr; /* "virt" */
    }
    return 0;
}

static u64 virtio_init(u8 *boot_params, u32 device_id, const char *what) {
    map_4gib();
    u64 mmio = find_device((const char *)(usize)*(u32 *)(boot_params + 0x228), device_id);
    if (!mmio) die(what);
    if (rd32(mmio + 4) != 2) die("virtio-mmio version is not 2");
    wr32(mmio + 0x70, 0);
    wr32(mmio + 0x70, 1);                           /* ACKNOWLEDGE */
    wr32(mmio + 0x70, 1 | 2);                       /* DRIVER */
    wr32(mmio + 0x24, 1); wr32(mmio + 0x20, 1);     /* VIRTIO_F_VERSION_1 (bit 32) */
    wr32(mmio + 0x24, 0); wr32(mmio + 0x20, 0);
    wr32(mmio + 0x70, 1 | 2 | 8);                   /* FEATURES_OK */
    if (!(rd32(mmio + 0x70) & 8)) die("device refused our features");
    return mmio;
}

static void vq_setup(u64 mmio, u32 sel, struct vq *q) {
    wr32(mmio + 0x30, sel);
    if (rd32(mmio + 0x34) < QN) die("virtqueue too small");
    wr32(mmio + 0x38, QN);
    wr32(mmio + 0x80, (u32)(usize)q->desc); wr32(mmio + 0x84, 0);
    wr32(mmio + 0x90, (u32)(usize)&q->avail); wr32(mmio + 0x94, 0);
    wr32(mmio + 0xa0, (u32)(usize)&q->used); wr32(mmio + 0xa4, 0);
    wr32(mmio + 0x44, 1);
}

/* Offer chain ``head`` on ``q`` (queue ``sel``), then poll until the device used it. */
static void vq_run(u64 mmio, u32 sel, struct vq *q, u16 head) {
    u16 idx = (u16)(q->avail.idx + 1);
    q->avail.ring[q->avail.idx % QN] = head;
    barrier();
    q->avail.idx = idx;
    barrier();
    wr32(mmio + 0x50, sel);
    while (*(volatile u16 *)&q->used.idx != idx) __asm__ volatile("pause");
    barrier();
}

#define GUEST_ENTRY(stack_size)                                                    \
    u8 guest_stack[stack_size] __attribute__((aligned(16), used));                 \
    __asm__(".section .text.entry,\"ax\"\n"                                      \
            ".global _start\n"                                                    \
            "_start:\n"                                                           \
            "  cli\n"                                                             \
            "  lea guest_stack+" #stack_size "(%rip), %rsp\n"                     \
            "  mov %rsi, %rdi\n"                                                  \
            "  call guest_main\n"                                                 \
            "1: hlt\n"                                                            \
            "  jmp 1b\n")
