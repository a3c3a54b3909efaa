/* The HTTP/1.1 protocol state of one server-side connection, without sockets:
 * bytes go in through fl_http_conn_feed, complete requests come out one at a
 * time, and responses are serialized into an output buffer that the caller
 * sends. The event loop (lua_http.c) and a fuzz harness drive the same code. */
#ifndef FL_HTTP_CONN_H
#define FL_HTTP_CONN_H

#include <http_parser.h>
#include <stddef.h>

typedef struct {
    char *data;
    size_t len, cap;
} fl_buf;

int fl_buf_add(fl_buf *b, const void *p, size_t n); /* 0, or -1 when out of memory */
int fl_buf_addf(fl_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void fl_buf_free(fl_buf *b);

typedef struct {
    const char *name, *value;
    size_t name_len, value_len;
} fl_http_header;

/* One parsed request. Headers are "name\0value\0" pairs, names lower-cased. */
typedef struct {
    int method; /* enum http_method */
    int http_major, http_minor;
    int keep_alive; /* the connection may serve another request after this one */
    fl_buf url, headers, body;
} fl_http_request;

/* The request target split into path (without query) and query (without '?'). */
void fl_http_request_target(const fl_http_request *r, const char **path, size_t *path_len,
                            const char **query, size_t *query_len);
/* Header pairs from http_parser's on_header_field / on_header_value callbacks, which may
 * split a name or value into pieces: *last is the kind of the piece before (start with
 * FL_HDR_NONE). Names are lower-cased. 0, or -1 when out of memory. */
enum { FL_HDR_NONE, FL_HDR_FIELD, FL_HDR_VALUE };
int fl_http_header_piece(fl_buf *pairs, int *last, int kind, const char *at, size_t n);
/* Ends the last pair (a name without a value gets an empty one) at the end of a head. */
int fl_http_header_end(fl_buf *pairs, int *last);
/* Iterates "name\0value\0" pairs: fills h and returns 1, or 0 after the last.
 * Start with *pos = 0. */
int fl_http_header_next(const fl_buf *pairs, size_t *pos, fl_http_header *h);
void fl_http_request_free(fl_http_request *r);

typedef struct {
    size_t max_header_bytes, max_body_bytes;
} fl_http_limits;

enum fl_http_conn_state {
    FL_HC_READING,   /* parsing the next request */
    FL_HC_WAITING,   /* a complete request awaits its response */
    FL_HC_STREAMING, /* a chunked response is being written */
    FL_HC_CLOSING,   /* nothing more is parsed; close once the output is sent */
};

enum { FL_HTTP_MORE, FL_HTTP_REQUEST, FL_HTTP_ERROR };

typedef struct {
    http_parser parser;
    fl_http_limits lim;
    enum fl_http_conn_state state;
    fl_buf in;      /* received bytes; parsing resumes at in_off */
    size_t in_off;
    fl_buf out;     /* serialized output; out_off bytes of it are already sent */
    size_t out_off;
    fl_http_request *req; /* being parsed, or complete and awaiting its response */
    size_t head_bytes;    /* bytes of the current request's head so far */
    int in_message;       /* a request has begun and is not yet complete */
    int head_done, message_done;
    int last_cb;          /* the header callback seen last: field or value */
    int stream_chunked;   /* the current stream uses chunked encoding (HTTP/1.1) */
    int close_after;      /* close once the current response is finished */
    int error_status;     /* set by a callback that refuses the request */
    char error[192];
} fl_http_conn;

void fl_http_conn_init(fl_http_conn *c, const fl_http_limits *lim);
void fl_http_conn_free(fl_http_conn *c);

/* Appends received bytes and parses them when a request may be read:
 * FL_HTTP_REQUEST: c->req is complete and the state is FL_HC_WAITING;
 * FL_HTTP_ERROR: an error response is queued and the state is FL_HC_CLOSING;
 * FL_HTTP_MORE: everything buffered is parsed (or kept for later). -1: out of memory. */
int fl_http_conn_feed(fl_http_conn *c, const char *buf, size_t len);
/* Parses what is buffered (after a response is finished); same results as feed. */
int fl_http_conn_parse(fl_http_conn *c);

/* Queues an error response with an OpenAI-style JSON body; the connection then
 * closes. Also used by the event loop for 408 and 503. */
int fl_http_conn_error(fl_http_conn *c, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Responses to the request in FL_HC_WAITING. Header names and values are checked
 * (no CR/LF, no Content-Length or Transfer-Encoding, Connection only "close");
 * a refusal returns -1 with msg filled and changes nothing. Afterwards the state is
 * FL_HC_READING (the request freed, parse again) or FL_HC_CLOSING. */
int fl_http_conn_respond(fl_http_conn *c, int status, const fl_http_header *h, int nh,
                         const char *body, size_t len, char *msg, size_t msgsz);
int fl_http_conn_start_stream(fl_http_conn *c, int status, const fl_http_header *h, int nh,
                              char *msg, size_t msgsz);
int fl_http_conn_write(fl_http_conn *c, const char *data, size_t len);
int fl_http_conn_finish(fl_http_conn *c);

/* Bytes serialized and not yet sent. */
static inline size_t fl_http_conn_pending(const fl_http_conn *c) { return c->out.len - c->out_off; }
/* Marks n output bytes as sent, dropping them once all are. */
void fl_http_conn_sent(fl_http_conn *c, size_t n);
/* Bytes received and not yet parsed. */
static inline size_t fl_http_conn_unparsed(const fl_http_conn *c) { return c->in.len - c->in_off; }

#endif
