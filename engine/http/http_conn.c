/* HTTP/1.1 server-side protocol state of one connection (see http_conn.h).
 * The parser is paused at the end of each request's head (to apply the size
 * limits and answer Expect: 100-continue before the body is read) and at the end
 * of each request (so pipelined requests are handed out one at a time). */
#include "http_conn.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Room for n more bytes; 0, or -1 when out of memory. */
static int reserve(fl_buf *b, size_t n) {
    if (n <= b->cap - b->len) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap - b->len < n) {
        if (cap > SIZE_MAX / 2) return -1;
        cap *= 2;
    }
    char *d = realloc(b->data, cap);
    if (!d) return -1;
    b->data = d;
    b->cap = cap;
    return 0;
}

int fl_buf_add(fl_buf *b, const void *p, size_t n) {
    if (reserve(b, n)) return -1;
    if (n) memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
}

int fl_buf_addf(fl_buf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || reserve(b, (size_t)n + 1)) return -1; /* + 1: vsnprintf writes a NUL */
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

void fl_buf_free(fl_buf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

void fl_http_request_free(fl_http_request *r) {
    if (!r) return;
    fl_buf_free(&r->url);
    fl_buf_free(&r->headers);
    fl_buf_free(&r->body);
    free(r);
}

void fl_http_request_target(const fl_http_request *r, const char **path, size_t *path_len,
                            const char **query, size_t *query_len) {
    struct http_parser_url u;
    http_parser_url_init(&u);
    *query = "";
    *query_len = 0;
    if (r->url.len == 0 || http_parser_parse_url(r->url.data, r->url.len, 0, &u) != 0) {
        /* "*" (OPTIONS) and other targets that are no URL pass through whole. */
        *path = r->url.len ? r->url.data : "";
        *path_len = r->url.len;
        return;
    }
    if (u.field_set & (1 << UF_PATH)) {
        *path = r->url.data + u.field_data[UF_PATH].off;
        *path_len = u.field_data[UF_PATH].len;
    } else {
        *path = "/";
        *path_len = 1;
    }
    if (u.field_set & (1 << UF_QUERY)) {
        *query = r->url.data + u.field_data[UF_QUERY].off;
        *query_len = u.field_data[UF_QUERY].len;
    }
}

int fl_http_header_next(const fl_buf *pairs, size_t *pos, fl_http_header *h) {
    const char *base = pairs->data;
    size_t end = pairs->len;
    if (*pos >= end) return 0;
    const char *n = base + *pos, *nz = memchr(n, 0, end - *pos);
    if (!nz || (size_t)(nz + 1 - base) >= end) return 0;
    const char *v = nz + 1, *vz = memchr(v, 0, end - (size_t)(v - base));
    if (!vz) return 0;
    h->name = n;
    h->name_len = (size_t)(nz - n);
    h->value = v;
    h->value_len = (size_t)(vz - v);
    *pos = (size_t)(vz + 1 - base);
    return 1;
}

int fl_http_header_piece(fl_buf *pairs, int *last, int kind, const char *at, size_t n) {
    /* A new name or value ends the one before. */
    if (*last != FL_HDR_NONE && *last != kind && fl_buf_add(pairs, "", 1)) return -1;
    size_t start = pairs->len;
    if (fl_buf_add(pairs, at, n)) return -1;
    if (kind == FL_HDR_FIELD)
        for (size_t i = start; i < pairs->len; i++)
            if (pairs->data[i] >= 'A' && pairs->data[i] <= 'Z') pairs->data[i] += 'a' - 'A';
    *last = kind;
    return 0;
}

int fl_http_header_end(fl_buf *pairs, int *last) {
    int bad = 0;
    if (*last == FL_HDR_FIELD) bad = fl_buf_add(pairs, "", 1) || fl_buf_add(pairs, "", 1);
    if (*last == FL_HDR_VALUE) bad = fl_buf_add(pairs, "", 1);
    *last = FL_HDR_NONE;
    return bad ? -1 : 0;
}

/* ---- parser callbacks ---- */

static int refuse(fl_http_conn *c, int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->error, sizeof c->error, fmt, ap);
    va_end(ap);
    c->error_status = status;
    return -1;
}

static int on_message_begin(http_parser *p) {
    fl_http_conn *c = p->data;
    fl_http_request_free(c->req);
    c->req = calloc(1, sizeof *c->req);
    if (!c->req) return refuse(c, 500, "server out of memory");
    c->in_message = 1;
    c->head_done = c->message_done = 0;
    c->last_cb = FL_HDR_NONE;
    return 0;
}

static int on_url(http_parser *p, const char *at, size_t n) {
    fl_http_conn *c = p->data;
    return fl_buf_add(&c->req->url, at, n) ? refuse(c, 500, "server out of memory") : 0;
}

/* A header name or value piece; trailer fields of a chunked body (after the head) count
 * against the header limit as well. */
static int header_piece(http_parser *p, int kind, const char *at, size_t n) {
    fl_http_conn *c = p->data;
    if (c->head_done) {
        c->head_bytes += n;
        if (c->head_bytes > c->lim.max_header_bytes)
            return refuse(c, 431, "request trailer fields larger than the limit of %zu bytes",
                          c->lim.max_header_bytes);
    }
    if (fl_http_header_piece(&c->req->headers, &c->last_cb, kind, at, n))
        return refuse(c, 500, "server out of memory");
    return 0;
}

static int on_header_field(http_parser *p, const char *at, size_t n) {
    return header_piece(p, FL_HDR_FIELD, at, n);
}

static int on_header_value(http_parser *p, const char *at, size_t n) {
    return header_piece(p, FL_HDR_VALUE, at, n);
}

/* Ends the last header pair, whatever callback came last. */
static int end_headers(fl_http_conn *c) {
    return fl_http_header_end(&c->req->headers, &c->last_cb) ? refuse(c, 500, "server out of memory") : 0;
}

static int on_headers_complete(http_parser *p) {
    fl_http_conn *c = p->data;
    if (end_headers(c)) return -1;
    c->head_done = 1;
    http_parser_pause(p, 1);
    return 0;
}

static int on_body(http_parser *p, const char *at, size_t n) {
    fl_http_conn *c = p->data;
    fl_buf *b = &c->req->body;
    if (n > c->lim.max_body_bytes - b->len)
        return refuse(c, 413, "request body larger than the limit of %zu bytes",
                      c->lim.max_body_bytes);
    return fl_buf_add(b, at, n) ? refuse(c, 500, "server out of memory") : 0;
}

static int on_message_complete(http_parser *p) {
    fl_http_conn *c = p->data;
    fl_http_request *r = c->req;
    if (end_headers(c)) return -1;
    r->method = p->method;
    r->http_major = p->http_major;
    r->http_minor = p->http_minor;
    /* An upgrade is not supported: answer the request, then close. */
    r->keep_alive = http_should_keep_alive(p) && !p->upgrade;
    c->message_done = 1;
    c->in_message = 0;
    http_parser_pause(p, 1);
    return 0;
}

static const http_parser_settings settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* ---- connection ---- */

void fl_http_conn_init(fl_http_conn *c, const fl_http_limits *lim) {
    memset(c, 0, sizeof *c);
    c->lim = *lim;
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
    c->state = FL_HC_READING;
}

void fl_http_conn_free(fl_http_conn *c) {
    fl_buf_free(&c->in);
    fl_buf_free(&c->out);
    fl_http_request_free(c->req);
    c->req = NULL;
}

static void json_escape(fl_buf *b, const char *s) {
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') fl_buf_addf(b, "\\%c", ch);
        else if (ch < 0x20) fl_buf_addf(b, "\\u%04x", ch);
        else fl_buf_add(b, s, 1);
    }
}

static void go_closing(fl_http_conn *c) {
    c->state = FL_HC_CLOSING;
    fl_http_request_free(c->req);
    c->req = NULL;
    c->in_message = 0;
    fl_buf_free(&c->in);
    c->in_off = 0;
}

int fl_http_conn_error(fl_http_conn *c, int status, const char *fmt, ...) {
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fl_buf body = {0};
    const char *head = "{\"error\":{\"message\":\"";
    fl_buf_add(&body, head, strlen(head));
    json_escape(&body, msg);
    /* The shape and types of lua/flexllm/server/reply.lua's errors. */
    int bad = fl_buf_addf(&body, "\",\"type\":\"%s\",\"param\":null,\"code\":null}}",
                          status >= 500 ? "server_error" : "invalid_request_error");
    bad |= fl_buf_addf(&c->out,
                       "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                       "Content-Length: %zu\r\nConnection: close\r\n\r\n",
                       status, http_status_str((enum http_status)status), body.len);
    bad |= fl_buf_add(&c->out, body.data, body.len);
    fl_buf_free(&body);
    go_closing(c);
    return bad ? -1 : 0;
}

static int parse_failed(fl_http_conn *c) {
    enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);
    if (c->error_status) fl_http_conn_error(c, c->error_status, "%s", c->error);
    else if (e == HPE_HEADER_OVERFLOW)
        fl_http_conn_error(c, 431, "request headers larger than the limit of %zu bytes",
                           c->lim.max_header_bytes);
    else
        fl_http_conn_error(c, 400, "malformed HTTP request: %s", http_errno_description(e));
    return FL_HTTP_ERROR;
}

static int header_is(const fl_http_request *r, const char *name, const char *value) {
    fl_http_header h;
    size_t pos = 0;
    size_t nl = strlen(name), vl = strlen(value);
    while (fl_http_header_next(&r->headers, &pos, &h))
        if (h.name_len == nl && !memcmp(h.name, name, nl) && h.value_len == vl &&
            !strncasecmp(h.value, value, vl))
            return 1;
    return 0;
}

/* Decisions at the end of a head, before any of the body is read. */
static int head_complete(fl_http_conn *c) {
    http_parser *p = &c->parser;
    if ((p->flags & F_CONTENTLENGTH) && p->content_length > c->lim.max_body_bytes) {
        fl_http_conn_error(c, 413,
                           "request body of %llu bytes (Content-Length) is larger than the "
                           "limit of %zu bytes",
                           (unsigned long long)p->content_length, c->lim.max_body_bytes);
        return FL_HTTP_ERROR;
    }
    int has_body = (p->flags & F_CHUNKED) || ((p->flags & F_CONTENTLENGTH) && p->content_length);
    if (has_body && p->http_major == 1 && p->http_minor >= 1 &&
        header_is(c->req, "expect", "100-continue") &&
        fl_buf_add(&c->out, "HTTP/1.1 100 Continue\r\n\r\n", 25))
        return -1;
    return FL_HTTP_MORE;
}

static void compact_input(fl_http_conn *c) {
    if (c->in_off == c->in.len) {
        c->in.len = c->in_off = 0;
    } else if (c->in_off > 65536 && c->in_off > c->in.len / 2) {
        memmove(c->in.data, c->in.data + c->in_off, c->in.len - c->in_off);
        c->in.len -= c->in_off;
        c->in_off = 0;
    }
}

int fl_http_conn_parse(fl_http_conn *c) {
    while (c->state == FL_HC_READING && c->in_off < c->in.len) {
        int in_head = !c->head_done;
        size_t n = http_parser_execute(&c->parser, &settings, c->in.data + c->in_off,
                                       c->in.len - c->in_off);
        enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);
        c->in_off += n;
        if (in_head) {
            /* Paused at the end of a head, the parser leaves its final LF unread. */
            int paused_at_head = e == HPE_PAUSED && c->head_done && !c->message_done;
            c->head_bytes += n + (size_t)paused_at_head;
            if (c->head_bytes > c->lim.max_header_bytes && !c->error_status) {
                fl_http_conn_error(c, 431, "request headers larger than the limit of %zu bytes",
                                   c->lim.max_header_bytes);
                return FL_HTTP_ERROR;
            }
        }
        if (e != HPE_PAUSED && e != HPE_OK) return parse_failed(c);
        if (e != HPE_PAUSED) continue;
        http_parser_pause(&c->parser, 0);
        if (c->message_done) {
            c->message_done = 0;
            c->head_done = 0;
            c->head_bytes = 0;
            c->state = FL_HC_WAITING;
            compact_input(c);
            return FL_HTTP_REQUEST;
        }
        int r = head_complete(c);
        if (r != FL_HTTP_MORE) return r;
    }
    compact_input(c);
    return FL_HTTP_MORE;
}

int fl_http_conn_feed(fl_http_conn *c, const char *buf, size_t len) {
    if (c->state == FL_HC_CLOSING) return FL_HTTP_MORE; /* nothing more is read */
    if (fl_buf_add(&c->in, buf, len)) return -1;
    return fl_http_conn_parse(c);
}

/* ---- responses ---- */

static int is_token(const char *s, size_t n) {
    static const char extra[] = "!#$%&'*+-.^_`|~";
    if (!n) return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
              (ch && strchr(extra, ch))))
            return 0;
    }
    return 1;
}

static int name_is(const fl_http_header *h, const char *name) {
    return h->name_len == strlen(name) && !strncasecmp(h->name, name, h->name_len);
}

/* Serializes the status line and headers. `framing` is the Content-Length or
 * Transfer-Encoding line to add (NULL for none). */
static int write_head(fl_http_conn *c, int status, const fl_http_header *h, int nh,
                      const char *framing, char *msg, size_t msgsz) {
    if (status < 200 || status > 599) {
        snprintf(msg, msgsz, "status %d is not a final HTTP status (200-599)", status);
        return -1;
    }
    int close_after = !c->req->keep_alive;
    for (int i = 0; i < nh; i++) {
        if (!is_token(h[i].name, h[i].name_len)) {
            snprintf(msg, msgsz, "header name '%.*s' is not an HTTP token", (int)h[i].name_len,
                     h[i].name);
            return -1;
        }
        for (size_t k = 0; k < h[i].value_len; k++) {
            char ch = h[i].value[k];
            if (ch == '\r' || ch == '\n' || ch == 0) {
                snprintf(msg, msgsz, "header '%.*s' has a CR, LF or NUL in its value",
                         (int)h[i].name_len, h[i].name);
                return -1;
            }
        }
        if (name_is(&h[i], "content-length") || name_is(&h[i], "transfer-encoding")) {
            snprintf(msg, msgsz, "header '%.*s' is set by the server itself", (int)h[i].name_len,
                     h[i].name);
            return -1;
        }
        if (name_is(&h[i], "connection")) {
            if (h[i].value_len != 5 || strncasecmp(h[i].value, "close", 5)) {
                snprintf(msg, msgsz, "header 'connection' may only be 'close'");
                return -1;
            }
            close_after = 1;
        }
    }
    int bad = fl_buf_addf(&c->out, "HTTP/1.1 %d %s\r\n", status,
                          http_status_str((enum http_status)status));
    for (int i = 0; i < nh; i++) {
        if (name_is(&h[i], "connection")) continue;
        bad |= fl_buf_add(&c->out, h[i].name, h[i].name_len);
        bad |= fl_buf_add(&c->out, ": ", 2);
        bad |= fl_buf_add(&c->out, h[i].value, h[i].value_len);
        bad |= fl_buf_add(&c->out, "\r\n", 2);
    }
    if (framing) bad |= fl_buf_add(&c->out, framing, strlen(framing));
    if (close_after) bad |= fl_buf_add(&c->out, "Connection: close\r\n", 19);
    else if (c->req->http_minor == 0) bad |= fl_buf_add(&c->out, "Connection: keep-alive\r\n", 24);
    bad |= fl_buf_add(&c->out, "\r\n", 2);
    if (bad) {
        snprintf(msg, msgsz, "out of memory");
        return -1;
    }
    c->close_after = close_after;
    return 0;
}

/* The response is complete: serve the next request or close. */
static void response_done(fl_http_conn *c) {
    if (c->close_after) {
        go_closing(c);
        return;
    }
    fl_http_request_free(c->req);
    c->req = NULL;
    c->state = FL_HC_READING;
}

int fl_http_conn_respond(fl_http_conn *c, int status, const fl_http_header *h, int nh,
                         const char *body, size_t len, char *msg, size_t msgsz) {
    if (c->state != FL_HC_WAITING) {
        snprintf(msg, msgsz, "no request awaits a response");
        return -1;
    }
    int bodyless = status == 204 || status == 304;
    if (bodyless && len) {
        snprintf(msg, msgsz, "status %d has no body", status);
        return -1;
    }
    char framing[64] = "";
    if (!bodyless) snprintf(framing, sizeof framing, "Content-Length: %zu\r\n", len);
    size_t mark = c->out.len;
    if (write_head(c, status, h, nh, framing, msg, msgsz)) return -1;
    if (c->req->method != HTTP_HEAD && fl_buf_add(&c->out, body, len)) {
        c->out.len = mark;
        snprintf(msg, msgsz, "out of memory");
        return -1;
    }
    response_done(c);
    return 0;
}

int fl_http_conn_start_stream(fl_http_conn *c, int status, const fl_http_header *h, int nh,
                              char *msg, size_t msgsz) {
    if (c->state != FL_HC_WAITING) {
        snprintf(msg, msgsz, "no request awaits a response");
        return -1;
    }
    /* HTTP/1.0 has no chunked encoding: the body ends when the connection closes. */
    int chunked = c->req->http_major == 1 && c->req->http_minor >= 1;
    if (!chunked) c->req->keep_alive = 0;
    if (write_head(c, status, h, nh, chunked ? "Transfer-Encoding: chunked\r\n" : NULL, msg,
                   msgsz))
        return -1;
    c->stream_chunked = chunked;
    c->state = FL_HC_STREAMING;
    return 0;
}

int fl_http_conn_write(fl_http_conn *c, const char *data, size_t len) {
    if (c->state != FL_HC_STREAMING) return -1;
    /* An empty chunk would end the body; a HEAD response has none. */
    if (!len || c->req->method == HTTP_HEAD) return 0;
    if (!c->stream_chunked) return fl_buf_add(&c->out, data, len);
    int bad = fl_buf_addf(&c->out, "%zx\r\n", len);
    bad |= fl_buf_add(&c->out, data, len);
    bad |= fl_buf_add(&c->out, "\r\n", 2);
    return bad ? -1 : 0;
}

int fl_http_conn_finish(fl_http_conn *c) {
    if (c->state != FL_HC_STREAMING) return -1;
    int bad = c->stream_chunked && c->req->method != HTTP_HEAD && fl_buf_add(&c->out, "0\r\n\r\n", 5);
    response_done(c);
    return bad ? -1 : 0;
}

void fl_http_conn_sent(fl_http_conn *c, size_t n) {
    c->out_off += n;
    if (c->out_off >= c->out.len) {
        c->out.len = c->out_off = 0;
    } else if (c->out_off > 65536 && c->out_off > c->out.len / 2) {
        memmove(c->out.data, c->out.data + c->out_off, c->out.len - c->out_off);
        c->out.len -= c->out_off;
        c->out_off = 0;
    }
}
