/* libFuzzer target: one server connection's HTTP path (engine/http/http_conn.c) fed
 * arbitrary bytes in arbitrary pieces. The first input byte picks the piece size, so
 * the fuzzer also explores requests split at every boundary. Each complete request is
 * answered (alternately whole and streamed) so the response path and the resumption
 * of pipelined parsing run too. Crashes, sanitizer reports and leaks are the findings. */
#include "http_conn.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static void answer(fl_http_conn *c, int streamed) {
    char msg[128];
    fl_http_header h = {"content-type", "text/plain", 12, 10};
    const fl_http_request *r = c->req;
    if (streamed) {
        if (fl_http_conn_start_stream(c, 200, &h, 1, msg, sizeof msg) != 0) return;
        fl_http_conn_write(c, r->url.data, r->url.len);
        fl_http_conn_write(c, r->body.data, r->body.len);
        fl_http_conn_finish(c);
    } else {
        fl_http_conn_respond(c, 200, &h, 1, r->body.data, r->body.len, msg, sizeof msg);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    size_t piece = (size_t)data[0] % 64 + 1;
    data++, size--;
    fl_http_limits lim = {.max_header_bytes = 1024, .max_body_bytes = 4096};
    fl_http_conn c;
    fl_http_conn_init(&c, &lim);
    int answered = 0;
    for (size_t off = 0; off < size && c.state != FL_HC_CLOSING; off += piece) {
        size_t n = size - off < piece ? size - off : piece;
        int rc = fl_http_conn_feed(&c, (const char *)data + off, n);
        while (rc == FL_HTTP_REQUEST) {
            answer(&c, answered++ & 1);
            fl_http_conn_sent(&c, fl_http_conn_pending(&c));
            rc = c.state == FL_HC_READING ? fl_http_conn_parse(&c) : FL_HTTP_MORE;
        }
        if (rc < 0) break;
    }
    fl_http_conn_free(&c);
    return 0;
}
