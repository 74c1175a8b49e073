/*
 * blk_reader: reads its first virtio-blk disk over and over, as fast as the device lets it,
 * so that tests can watch Firecracker's drive rate limiter at work. Each completed 64 KiB
 * read prints one '*' on the serial console: the host counts them to measure the rate
 * without asking Firecracker (metrics also show block.rate_limiter_throttled_events).
 * Polling, one request in flight.
 */
#include "guest.h"

#define CHUNK 65536u /* bytes per read request */

static struct vq q;
static struct { u32 type, reserved; u64 sector; } req;
static u8 data[CHUNK] __attribute__((aligned(4096)));
static volatile u8 status;

void guest_main(u8 *boot_params);
void guest_main(u8 *boot_params) {
    u64 mmio = virtio_init(boot_params, 2, "no virtio-mmio block device on the command line");
    u64 sectors = rd32(mmio + 0x100) | (u64)rd32(mmio + 0x104) << 32;
    if (sectors < CHUNK / 512) die("disk smaller than one request");
    vq_setup(mmio, 0, &q);
    wr32(mmio + 0x70, 1 | 2 | 8 | 4);               /* DRIVER_OK */
    q.desc[0] = (struct desc){(u64)(usize)&req, sizeof req, 1, 1};          /* NEXT */
    q.desc[1] = (struct desc){(u64)(usize)data, CHUNK, 1 | 2, 2};           /* NEXT|WRITE */
    q.desc[2] = (struct desc){(u64)(usize)&status, 1, 2, 0};                /* WRITE */
    say("IRONCLAW-BLK-READER READY\n");
    for (u64 sector = 0;; sector = sector + 2 * CHUNK / 512 > sectors ? 0 : sector + CHUNK / 512) {
        req.type = 0; /* VIRTIO_BLK_T_IN */
        req.sector = sector;
        status = 0xff;
        vq_run(mmio, 0, &q, 0);
        if (status != 0) die("read failed");
        outb(0x3f8, '*');
    }
}

GUEST_ENTRY(16384);
