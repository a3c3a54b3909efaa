/* The Lua module flexllm.http, client half: HTTP/1.1 requests on their own libev
 * loop, one connection per request, with the response delivered as head / data /
 * done (or error) events from cl:poll. Used for load generation and tests. */
#include "lua_http.h"

#include <errno.h>
#include <ev.h>
#include <lauxlib.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define CLIENT_MT "flexllm.http.client"
#define READ_CHUNK 65536

typedef struct client client;

typedef struct creq {
    client *cl;
    uint64_t id;
    int fd;
    ev_io io;
    http_parser parser;
    struct addrinfo *addrs, *addr; /* resolved addresses; the one being tried */
    char where[300];               /* host:port, for messages */
    fl_buf out;
    size_t out_off;
    fl_buf headers; /* "name\0value\0" pairs of the response being parsed */
    int last_cb;    /* FL_HDR_*: see fl_http_header_piece */
    int connected, is_head, finished;
    struct creq *prev, *next;
} creq;

enum { CE_HEAD, CE_DATA, CE_DONE, CE_ERROR };

typedef struct {
    int kind;
    uint64_t req;
    int status;
    fl_buf data; /* head: header pairs; data: body bytes; error: the message */
} cevent;

struct client {
    struct ev_loop *loop;
    creq *all;
    uint64_t next_id;
    size_t active;
    cevent *evq;
    size_t nev, evcap;
    int oom; /* an event was lost for want of memory */
    char *scratch;
};

static cevent *queue_event(client *cl, int kind, creq *r) {
    if (cl->nev == cl->evcap) {
        size_t cap = cl->evcap ? 2 * cl->evcap : 16;
        cevent *q = realloc(cl->evq, cap * sizeof *q);
        if (!q) {
            cl->oom = 1;
            return NULL;
        }
        cl->evq = q;
        cl->evcap = cap;
    }
    cevent *e = &cl->evq[cl->nev++];
    memset(e, 0, sizeof *e);
    e->kind = kind;
    e->req = r->id;
    return e;
}

static void req_free(creq *r) {
    client *cl = r->cl;
    ev_io_stop(cl->loop, &r->io);
    if (r->fd >= 0) close(r->fd);
    if (r->addrs) freeaddrinfo(r->addrs);
    fl_buf_free(&r->out);
    fl_buf_free(&r->headers);
    if (r->prev) r->prev->next = r->next;
    else cl->all = r->next;
    if (r->next) r->next->prev = r->prev;
    cl->active--;
    free(r);
}

static void req_fail(creq *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void req_fail(creq *r, const char *fmt, ...) {
    cevent *e = queue_event(r->cl, CE_ERROR, r);
    if (e) {
        char msg[512];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        fl_buf_add(&e->data, msg, strlen(msg));
    }
    req_free(r);
}

/* ---- response parser callbacks ---- */

static int on_header_field(http_parser *p, const char *at, size_t n) {
    creq *r = p->data;
    return fl_http_header_piece(&r->headers, &r->last_cb, FL_HDR_FIELD, at, n);
}

static int on_header_value(http_parser *p, const char *at, size_t n) {
    creq *r = p->data;
    return fl_http_header_piece(&r->headers, &r->last_cb, FL_HDR_VALUE, at, n);
}

static int on_headers_complete(http_parser *p) {
    creq *r = p->data;
    if (fl_http_header_end(&r->headers, &r->last_cb)) return -1;
    if (p->status_code / 100 == 1) return 0; /* an interim response: the real one follows */
    cevent *e = queue_event(r->cl, CE_HEAD, r);
    if (!e) return -1;
    e->status = p->status_code;
    e->data = r->headers; /* the event takes the pairs */
    memset(&r->headers, 0, sizeof r->headers);
    return r->is_head; /* a response to HEAD has no body, whatever it says */
}

static int on_body(http_parser *p, const char *at, size_t n) {
    creq *r = p->data;
    cevent *e = queue_event(r->cl, CE_DATA, r);
    return !e || fl_buf_add(&e->data, at, n) ? -1 : 0;
}

static int on_message_complete(http_parser *p) {
    creq *r = p->data;
    if (p->status_code / 100 == 1) {
        r->headers.len = 0;
        return 0;
    }
    r->finished = 1;
    http_parser_pause(p, 1); /* anything after the response is not ours */
    return 0;
}

static const http_parser_settings settings = {
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* ---- connection ---- */

static void req_io_cb(struct ev_loop *loop, ev_io *w, int revents);

static void watch(creq *r, int events) {
    ev_io_stop(r->cl->loop, &r->io);
    ev_io_set(&r->io, r->fd, events);
    ev_io_start(r->cl->loop, &r->io);
}

/* Starts connecting to r->addr and the addresses after it; 0, or -1 after failing r. */
static int start_connect(creq *r) {
    int err = 0;
    for (; r->addr; r->addr = r->addr->ai_next) {
        if (r->fd >= 0) close(r->fd);
        struct addrinfo *ai = r->addr;
        r->fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                       ai->ai_protocol);
        if (r->fd < 0) {
            err = errno;
            continue;
        }
        int one = 1;
        setsockopt(r->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(r->fd, ai->ai_addr, ai->ai_addrlen) == 0 || errno == EINPROGRESS) {
            watch(r, EV_WRITE);
            return 0;
        }
        err = errno;
    }
    req_fail(r, "connect to %s: %s", r->where, strerror(err));
    return -1;
}

/* Connected or writable: sends what it can. Returns -1 when r is gone (freed). */
static int on_writable(creq *r) {
    if (!r->connected) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(r->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            r->addr = r->addr->ai_next;
            if (!r->addr) {
                req_fail(r, "connect to %s: %s", r->where, strerror(err));
                return -1;
            }
            return start_connect(r);
        }
        r->connected = 1;
        /* Read while sending: a server may answer (413) before taking the whole body. */
        watch(r, EV_READ | EV_WRITE);
    }
    while (r->out_off < r->out.len) {
        ssize_t n = send(r->fd, r->out.data + r->out_off, r->out.len - r->out_off, MSG_NOSIGNAL);
        if (n > 0) {
            r->out_off += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return 0;
        } else {
            req_fail(r, "send to %s: %s", r->where, strerror(errno));
            return -1;
        }
    }
    watch(r, EV_READ);
    return 0;
}

/* Readable: parses what arrived. Returns -1 when r is gone (finished or failed). */
static int on_readable(creq *r) {
    client *cl = r->cl;
    ssize_t n = recv(r->fd, cl->scratch, READ_CHUNK, 0);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return 0;
    if (n < 0) {
        req_fail(r, "receive from %s: %s", r->where, strerror(errno));
        return -1;
    }
    /* n == 0 tells the parser the stream ended: it completes a body read to EOF. */
    http_parser_execute(&r->parser, &settings, cl->scratch, (size_t)n);
    enum http_errno e = HTTP_PARSER_ERRNO(&r->parser);
    if (r->finished) {
        if (queue_event(cl, CE_DONE, r)) req_free(r);
        else req_fail(r, "out of memory");
    } else if (n == 0) {
        req_fail(r, "%s closed the connection before the response was complete", r->where);
    } else if (e != HPE_OK) {
        req_fail(r, "malformed HTTP response from %s: %s", r->where, http_errno_description(e));
    } else {
        return 0;
    }
    return -1;
}

static void req_io_cb(struct ev_loop *loop, ev_io *w, int revents) {
    creq *r = w->data;
    if (r->connected && (revents & EV_READ) && on_readable(r)) return;
    if (revents & EV_WRITE) on_writable(r);
}

/* ---- Lua ---- */

static client **check_client_ud(lua_State *L) {
    return luaL_checkudata(L, 1, CLIENT_MT);
}

static client *check_client(lua_State *L) {
    client *cl = *check_client_ud(L);
    if (!cl) luaL_error(L, "http client is closed");
    return cl;
}

static int l_client(lua_State *L) {
    client *cl = calloc(1, sizeof *cl);
    char *scratch = malloc(READ_CHUNK);
    struct ev_loop *loop = cl && scratch ? ev_loop_new(EVFLAG_AUTO) : NULL;
    if (!loop) {
        free(cl);
        free(scratch);
        return luaL_error(L, "http.client: cannot create the event loop");
    }
    cl->loop = loop;
    cl->scratch = scratch;
    client **ud = lua_newuserdata(L, sizeof *ud);
    *ud = cl;
    luaL_getmetatable(L, CLIENT_MT);
    lua_setmetatable(L, -2);
    return 1;
}

static const char *field_str(lua_State *L, const char *k, const char *def) {
    lua_getfield(L, 2, k);
    const char *v = def;
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "request: '%s' must be a string", k);
        v = lua_tostring(L, -1);
    }
    lua_pop(L, 1); /* the request table keeps the string alive */
    if (!v) luaL_error(L, "request: '%s' is required", k);
    return v;
}

static int l_request(lua_State *L) {
    client *cl = check_client(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    const char *host = field_str(L, "host", NULL);
    const char *method = field_str(L, "method", "GET");
    const char *path = field_str(L, "path", "/");
    int port = (int)fl_http_opt_num(L, 2, "port", 80, 1, 65535);
    size_t blen = 0;
    lua_getfield(L, 2, "body");
    const char *body = "";
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "request: 'body' must be a string");
        body = lua_tolstring(L, -1, &blen);
    }
    lua_pop(L, 1);
    for (const char *p = method; *p; p++)
        if (*p <= ' ' || *p >= 127) luaL_error(L, "request: bad method '%s'", method);
    for (const char *p = path; *p; p++)
        if (*p <= ' ' || *p >= 127) luaL_error(L, "request: bad path '%s' (no spaces or controls)", path);
    if (*path != '/' && strcmp(path, "*")) luaL_error(L, "request: path '%s' must start with '/'", path);
    lua_getfield(L, 2, "headers");
    int nh;
    fl_http_header *h = fl_http_check_headers(L, lua_gettop(L), "request", &nh);
    lua_pop(L, 1);

    creq *r = calloc(1, sizeof *r);
    if (!r) {
        free(h);
        return luaL_error(L, "request: out of memory");
    }
    fl_buf *o = &r->out;
    int has_host = 0, bad = 0;
    bad |= fl_buf_addf(o, "%s %s HTTP/1.1\r\n", method, path);
    const char *msg = NULL;
    for (int i = 0; i < nh && !msg; i++) {
        if (memchr(h[i].name, '\r', h[i].name_len) || memchr(h[i].name, '\n', h[i].name_len) ||
            memchr(h[i].value, '\r', h[i].value_len) || memchr(h[i].value, '\n', h[i].value_len))
            msg = "has a CR or LF";
        if ((h[i].name_len == 14 && !strncasecmp(h[i].name, "content-length", 14)) ||
            (h[i].name_len == 17 && !strncasecmp(h[i].name, "transfer-encoding", 17)) ||
            (h[i].name_len == 10 && !strncasecmp(h[i].name, "connection", 10)))
            msg = "is set by the client itself";
        if (msg) {
            char name[64];
            snprintf(name, sizeof name, "%.*s", (int)h[i].name_len, h[i].name);
            free(h);
            fl_buf_free(o);
            free(r);
            return luaL_error(L, "request: header '%s' %s", name, msg);
        }
        has_host |= h[i].name_len == 4 && !strncasecmp(h[i].name, "host", 4);
        bad |= fl_buf_add(o, h[i].name, h[i].name_len) || fl_buf_add(o, ": ", 2) ||
               fl_buf_add(o, h[i].value, h[i].value_len) || fl_buf_add(o, "\r\n", 2);
    }
    free(h);
    if (!has_host) bad |= fl_buf_addf(o, "Host: %s:%d\r\n", host, port);
    /* One connection per request. */
    bad |= fl_buf_addf(o, "Content-Length: %zu\r\nConnection: close\r\n\r\n", blen);
    bad |= fl_buf_add(o, body, blen);
    if (bad) {
        fl_buf_free(o);
        free(r);
        return luaL_error(L, "request: out of memory");
    }

    r->cl = cl;
    r->id = ++cl->next_id;
    r->fd = -1;
    r->is_head = !strcmp(method, "HEAD");
    snprintf(r->where, sizeof r->where, "%s:%d", host, port);
    http_parser_init(&r->parser, HTTP_RESPONSE);
    r->parser.data = r;
    ev_init(&r->io, req_io_cb);
    r->io.data = r;
    r->next = cl->all;
    if (cl->all) cl->all->prev = r;
    cl->all = r;
    cl->active++;

    struct addrinfo hints = {0};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    char service[16];
    snprintf(service, sizeof service, "%d", port);
    uint64_t id = r->id; /* r is freed if it fails at once */
    int rc = getaddrinfo(host, service, &hints, &r->addrs);
    if (rc) {
        r->addrs = NULL;
        req_fail(r, "cannot resolve '%s': %s", host, gai_strerror(rc));
    } else {
        r->addr = r->addrs;
        start_connect(r);
    }
    lua_pushnumber(L, (lua_Number)id);
    return 1;
}

static int l_cpoll(lua_State *L) {
    client *cl = check_client(L);
    fl_http_turn(L, cl->loop, cl->nev == 0 && cl->active);
    static const char *kinds[] = {"head", "data", "done", "error"};
    lua_createtable(L, (int)cl->nev, 0);
    for (size_t i = 0; i < cl->nev; i++) {
        cevent *e = &cl->evq[i];
        lua_createtable(L, 0, 3);
        lua_pushstring(L, kinds[e->kind]);
        lua_setfield(L, -2, "kind");
        lua_pushnumber(L, (lua_Number)e->req);
        lua_setfield(L, -2, "req");
        if (e->kind == CE_HEAD) {
            lua_pushinteger(L, e->status);
            lua_setfield(L, -2, "status");
            fl_http_push_headers(L, &e->data);
            lua_setfield(L, -2, "headers");
        } else if (e->kind == CE_DATA || e->kind == CE_ERROR) {
            lua_pushlstring(L, e->data.len ? e->data.data : "", e->data.len);
            lua_setfield(L, -2, e->kind == CE_DATA ? "data" : "message");
        }
        fl_buf_free(&e->data);
        lua_rawseti(L, -2, (int)i + 1);
    }
    cl->nev = 0;
    if (cl->oom) {
        cl->oom = 0;
        return luaL_error(L, "poll: out of memory, events were lost");
    }
    return 1;
}

static int l_active(lua_State *L) {
    lua_pushnumber(L, (lua_Number)check_client(L)->active);
    return 1;
}

static int l_cclose(lua_State *L) {
    client **ud = check_client_ud(L);
    client *cl = *ud;
    if (!cl) return 0;
    while (cl->all) req_free(cl->all);
    for (size_t i = 0; i < cl->nev; i++) fl_buf_free(&cl->evq[i].data);
    free(cl->evq);
    ev_loop_destroy(cl->loop);
    free(cl->scratch);
    free(cl);
    *ud = NULL;
    return 0;
}

void fl_http_client_register(lua_State *L) {
    static const luaL_Reg methods[] = {
        {"request", l_request}, {"poll", l_cpoll}, {"active", l_active},
        {"close", l_cclose},    {NULL, NULL},
    };
    luaL_newmetatable(L, CLIENT_MT);
    lua_pushvalue(L, -1);
    lua_setfield(L, -2, "__index");
    luaL_register(L, NULL, methods);
    lua_pushcfunction(L, l_cclose);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
    lua_pushcfunction(L, l_client);
    lua_setfield(L, -2, "client");
}
