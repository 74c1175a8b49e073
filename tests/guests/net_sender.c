/*
 * net_sender: transmits Ethernet frames on its first virtio-net device as fast as the device
 * takes them, so that tests can watch Firecracker's tx rate limiter at work. Each frame sent
 * prints one '*' on the serial console, which the host counts (metrics also show
 * net.tx_rate_limiter_throttled). Polling, one frame in flight.
 */
#include "guest.h"

#define FRAME 1514u

static struct vq rxq, txq;
static u8 vnet_hdr[12];          /* virtio_net_hdr_v1, all zero: no offloads */
static u8 frame[FRAME] __attribute__((aligned(64)));

void guest_main(u8 *boot_params);
void guest_main(u8 *boot_params) {
    u64 mmio = virtio_init(boot_params, 1, "no virtio-mmio net device on the command line");
    vq_setup(mmio, 0, &rxq);     /* rx: valid but never filled (nothing is received) */
    vq_setup(mmio, 1, &txq);
    wr32(mmio + 0x70, 1 | 2 | 8 | 4);               /* DRIVER_OK */
    for (u32 i = 0; i < 6; i++) frame[i] = 0xff;    /* broadcast ... */
    frame[6] = 0x02;                                /* ... from a local address */
    frame[12] = 0x88; frame[13] = 0xb5;             /* local experimental EtherType */
    txq.desc[0] = (struct desc){(u64)(usize)vnet_hdr, sizeof vnet_hdr, 1, 1}; /* NEXT */
    txq.desc[1] = (struct desc){(u64)(usize)frame, FRAME, 0, 0};
    say("IRONCLAW-NET-SENDER READY\n");
    for (;;) {
        vq_run(mmio, 1, &txq, 0);
        outb(0x3f8, '*');
    }
}

GUEST_ENTRY(16384);
