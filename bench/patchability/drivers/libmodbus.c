/* libmodbus: a server context answering requests it is handed (modbus_reply, no network). */
#include <modbus.h>
#include <string.h>

long work(unsigned long i) {
    static modbus_t *ctx;
    static modbus_mapping_t *map;
    if (!ctx) {
        ctx = modbus_new_tcp("127.0.0.1", 1502);
        map = modbus_mapping_new(64, 64, 64, 64);
    }
    /* MBAP header + PDU: read holding registers 0..9, then write multiple registers. */
    uint8_t rd[] = {0, 1, 0, 0, 0, 6, 1, 0x03, 0, 0, 0, 10};
    uint8_t wr[] = {0, 2, 0, 0, 0, 11, 1, 0x10, 0, 2, 0, 2, 4, 0, (uint8_t)i, 0, 7};
    long r = 0;
    /* modbus_reply sends on the socket; without one it fails after building the answer. */
    r += modbus_reply(ctx, rd, sizeof rd, map);
    r += modbus_reply(ctx, wr, sizeof wr, map);
    uint16_t regs[2] = {0x4148, 0x4149};
    r += (long)modbus_get_float_abcd(regs);
    return r + map->tab_registers[2];
}
