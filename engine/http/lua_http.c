/* The Lua module flexllm.http, server half: a non-blocking HTTP/1.1 server on its
 * own libev loop, polled from Lua's main loop between engine iterations. Requests
 * come out of srv:poll as events; responses go in through srv:respond or
 * srv:start_stream / write / finish. The protocol itself is http_conn.c. */
#include "lua_http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define SERVER_MT "flexllm.http.server"
#define READ_CHUNK 65536
/* Input buffered ahead while a request is being answered: enough for pipelined
 * requests, and reading on is how a disconnect is seen during a long answer. */
#define READ_AHEAD 65536
#define LINGER_S 2.0     /* after an error response, how long to drain the client's input */
#define ACCEPT_PAUSE_S 0.1 /* out of file descriptors: how long before accepting again */
#define NBUCKETS 1024    /* connection id -> connection hash */

typedef struct server server;

enum { T_NONE, T_IDLE, T_REQUEST, T_WRITE, T_LINGER };

typedef struct conn {
    fl_http_conn h;
    server *s;
    int fd;
    uint64_t id;
    ev_io rio, wio;
    ev_timer timer;
    int tmode;            /* T_*: what the timer is waiting for */
    ev_tstamp last_write; /* when output last made progress */
    int busy;             /* a request was delivered and its response is not finished */
    int counted;          /* counts against max_connections: serving, not refused or closing */
    int lingering;        /* write side shut down; input drained until EOF */
    char remote[64];
    struct conn *hnext, *prev, *next;
} conn;

enum { EV_REQUEST, EV_CLOSED };

typedef struct {
    int kind;
    uint64_t conn;
    fl_http_request *req; /* a request event's data, moved out of its connection */
    char remote[64];
} event;

struct server {
    struct ev_loop *loop;
    int fd;
    int port;
    ev_io lio;
    ev_timer accept_pause;
    fl_http_limits lim;
    double idle_timeout, request_timeout;
    size_t max_output, max_conns;
    conn *all;
    conn *buckets[NBUCKETS];
    uint64_t next_id;
    size_t n_open, n_active;
    uint64_t accepted, requests, rejected;
    event *evq;
    size_t nev, evcap;
    char *scratch;
};

/* ---- events ---- */

static int queue_event(server *s, int kind, conn *c, fl_http_request *req) {
    if (s->nev == s->evcap) {
        size_t cap = s->evcap ? 2 * s->evcap : 16;
        event *q = realloc(s->evq, cap * sizeof *q);
        if (!q) return -1;
        s->evq = q;
        s->evcap = cap;
    }
    event *e = &s->evq[s->nev++];
    e->kind = kind;
    e->conn = c->id;
    e->req = req;
    memcpy(e->remote, c->remote, sizeof e->remote);
    return 0;
}

/* ---- connections ---- */

static conn *find_conn(server *s, uint64_t id) {
    for (conn *c = s->buckets[id % NBUCKETS]; c; c = c->hnext)
        if (c->id == id) return c;
    return NULL;
}

static void conn_close(conn *c) {
    server *s = c->s;
    /* Lua cancels the work of a request it can no longer answer. */
    if (c->busy) queue_event(s, EV_CLOSED, c, NULL);
    ev_io_stop(s->loop, &c->rio);
    ev_io_stop(s->loop, &c->wio);
    ev_timer_stop(s->loop, &c->timer);
    close(c->fd);
    conn **pp = &s->buckets[c->id % NBUCKETS];
    while (*pp != c) pp = &(*pp)->hnext;
    *pp = c->hnext;
    if (c->prev) c->prev->next = c->next;
    else s->all = c->next;
    if (c->next) c->next->prev = c->prev;
    s->n_open--;
    if (c->counted) s->n_active--;
    fl_http_conn_free(&c->h);
    free(c);
}

static void set_io(struct ev_loop *loop, ev_io *w, int on) {
    if (on && !ev_is_active(w)) ev_io_start(loop, w);
    if (!on && ev_is_active(w)) ev_io_stop(loop, w);
}

static void arm_timer(conn *c, int mode, ev_tstamp after) {
    server *s = c->s;
    c->tmode = mode;
    ev_timer_stop(s->loop, &c->timer);
    if (mode == T_NONE) return;
    ev_timer_set(&c->timer, after > 0 ? after : 0, 0);
    ev_timer_start(s->loop, &c->timer);
}

/* After any change to a connection: sends what it can, moves a finished connection
 * to its lingering close, sets the watchers and the timer. Returns -1 when the
 * connection is gone (freed), else 0. */
static int conn_service(conn *c) {
    server *s = c->s;
    fl_http_conn *h = &c->h;
    while (fl_http_conn_pending(h)) {
        ssize_t n = send(c->fd, h->out.data + h->out_off, fl_http_conn_pending(h), MSG_NOSIGNAL);
        if (n > 0) {
            fl_http_conn_sent(h, (size_t)n);
            c->last_write = ev_now(s->loop);
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        } else {
            conn_close(c); /* the peer is gone */
            return -1;
        }
    }
    size_t pending = fl_http_conn_pending(h);
    if (pending > s->max_output) {
        conn_close(c); /* a client that does not read its answers */
        return -1;
    }
    if (h->state == FL_HC_CLOSING && !pending && !c->lingering) {
        /* Closing with unread input would reset the connection and could destroy the
         * response in flight: shut the write side, then drain until the client closes. */
        shutdown(c->fd, SHUT_WR);
        c->lingering = 1;
        if (c->counted) s->n_active--; /* it serves nothing more */
        c->counted = 0;
    }
    set_io(s->loop, &c->wio, pending > 0);
    set_io(s->loop, &c->rio,
           c->lingering || (h->state != FL_HC_CLOSING && fl_http_conn_unparsed(h) < READ_AHEAD));

    int mode = c->lingering ? T_LINGER
             : pending      ? T_WRITE
             : c->busy      ? T_NONE
             : h->in_message ? T_REQUEST
             : h->state == FL_HC_READING ? T_IDLE : T_NONE;
    if (mode != c->tmode) {
        if (mode == T_WRITE) c->last_write = ev_now(s->loop); /* the stall clock starts now */
        double after = mode == T_LINGER  ? LINGER_S
                     : mode == T_WRITE   ? s->idle_timeout
                     : mode == T_REQUEST ? s->request_timeout
                                         : s->idle_timeout;
        arm_timer(c, mode, after);
    }
    return 0;
}

static void deliver(conn *c) {
    server *s = c->s;
    fl_http_request *r = malloc(sizeof *r);
    if (!r) {
        fl_http_conn_error(&c->h, 503, "server out of memory");
        return;
    }
    /* The event takes the request's data; the connection keeps what its response needs. */
    *r = *c->h.req;
    memset(&c->h.req->url, 0, sizeof c->h.req->url);
    memset(&c->h.req->headers, 0, sizeof c->h.req->headers);
    memset(&c->h.req->body, 0, sizeof c->h.req->body);
    if (queue_event(s, EV_REQUEST, c, r)) {
        fl_http_request_free(r);
        fl_http_conn_error(&c->h, 503, "server out of memory");
        return;
    }
    c->busy = 1;
    s->requests++;
}

/* Acts on a parse result. */
static void parsed(conn *c, int r) {
    if (r == FL_HTTP_REQUEST) deliver(c);
    else if (r == FL_HTTP_ERROR) c->s->rejected++;
    else if (r < 0) fl_http_conn_error(&c->h, 503, "server out of memory");
}

static void conn_read_cb(struct ev_loop *loop, ev_io *w, int revents) {
    conn *c = w->data;
    server *s = c->s;
    ssize_t n = recv(c->fd, s->scratch, READ_CHUNK, 0);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
    if (n <= 0) {
        conn_close(c); /* EOF or reset: the peer went away */
        return;
    }
    if (!c->lingering) parsed(c, fl_http_conn_feed(&c->h, s->scratch, (size_t)n));
    conn_service(c);
}

static void conn_write_cb(struct ev_loop *loop, ev_io *w, int revents) {
    conn_service(w->data);
}

static void conn_timer_cb(struct ev_loop *loop, ev_timer *w, int revents) {
    conn *c = w->data;
    server *s = c->s;
    int mode = c->tmode;
    c->tmode = T_NONE;
    if (mode == T_WRITE) {
        ev_tstamp idle = ev_now(loop) - c->last_write;
        if (idle < s->idle_timeout) {
            arm_timer(c, T_WRITE, s->idle_timeout - idle);
            return;
        }
        conn_close(c); /* the client stopped reading */
    } else if (mode == T_REQUEST) {
        fl_http_conn_error(&c->h, 408, "request not complete within %g seconds",
                           s->request_timeout);
        s->rejected++;
        conn_service(c);
    } else {
        conn_close(c); /* an idle keep-alive connection, or the end of a lingering close */
    }
}

static void accept_resume_cb(struct ev_loop *loop, ev_timer *w, int revents) {
    server *s = w->data;
    ev_io_start(loop, &s->lio);
}

static void format_remote(const struct sockaddr_storage *a, char *out, size_t n) {
    char ip[INET6_ADDRSTRLEN] = "?";
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *in = (const void *)a;
        inet_ntop(AF_INET, &in->sin_addr, ip, sizeof ip);
        snprintf(out, n, "%s:%u", ip, ntohs(in->sin_port));
    } else if (a->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const void *)a;
        inet_ntop(AF_INET6, &in6->sin6_addr, ip, sizeof ip);
        snprintf(out, n, "[%s]:%u", ip, ntohs(in6->sin6_port));
    } else {
        snprintf(out, n, "unknown");
    }
}

static void accept_cb(struct ev_loop *loop, ev_io *w, int revents) {
    server *s = w->data;
    for (;;) {
        struct sockaddr_storage addr;
        socklen_t alen = sizeof addr;
        int fd = accept4(s->fd, (struct sockaddr *)&addr, &alen, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                /* Level-triggered accept would spin: pause it briefly. */
                ev_io_stop(loop, &s->lio);
                ev_timer_set(&s->accept_pause, ACCEPT_PAUSE_S, 0);
                ev_timer_start(loop, &s->accept_pause);
            }
            return;
        }
        s->accepted++;
        int rejected = s->n_active >= s->max_conns;
        /* Busy answers linger at most LINGER_S each; past this many, a flood is just closed. */
        conn *c = rejected && s->n_open >= 2 * s->max_conns + 16 ? NULL : calloc(1, sizeof *c);
        if (!c) {
            s->rejected++;
            close(fd);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fl_http_conn_init(&c->h, &s->lim);
        c->s = s;
        c->fd = fd;
        c->id = ++s->next_id;
        c->counted = !rejected;
        c->last_write = ev_now(loop);
        format_remote(&addr, c->remote, sizeof c->remote);
        ev_io_init(&c->rio, conn_read_cb, fd, EV_READ);
        ev_io_init(&c->wio, conn_write_cb, fd, EV_WRITE);
        ev_timer_init(&c->timer, conn_timer_cb, 0, 0);
        /* I/O before timers: data that arrived while Lua was busy beats a deadline. */
        ev_set_priority(&c->timer, EV_MINPRI);
        c->rio.data = c->wio.data = c->timer.data = c;
        c->hnext = s->buckets[c->id % NBUCKETS];
        s->buckets[c->id % NBUCKETS] = c;
        c->next = s->all;
        if (s->all) s->all->prev = c;
        s->all = c;
        s->n_open++;
        if (rejected) {
            s->rejected++;
            fl_http_conn_error(&c->h, 503, "server busy: %zu connections open", s->n_active);
        } else {
            s->n_active++;
        }
        conn_service(c);
    }
}

/* ---- Lua: helpers shared with the client ---- */

void fl_http_push_headers(lua_State *L, const fl_buf *pairs) {
    lua_newtable(L);
    fl_http_header h;
    size_t pos = 0;
    while (fl_http_header_next(pairs, &pos, &h)) {
        lua_pushlstring(L, h.name, h.name_len);
        lua_pushvalue(L, -1);
        lua_rawget(L, -3);
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            lua_pushlstring(L, h.value, h.value_len);
        } else {
            lua_pushliteral(L, ", ");
            lua_pushlstring(L, h.value, h.value_len);
            lua_concat(L, 3);
        }
        lua_rawset(L, -3);
    }
}

fl_http_header *fl_http_check_headers(lua_State *L, int idx, const char *what, int *n) {
    *n = 0;
    if (lua_isnoneornil(L, idx)) return NULL;
    if (!lua_istable(L, idx)) luaL_error(L, "%s: headers must be a table", what);
    size_t bytes = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        int vt = lua_type(L, -1);
        if (lua_type(L, -2) != LUA_TSTRING)
            luaL_error(L, "%s: header names must be strings", what);
        if (vt != LUA_TSTRING && vt != LUA_TNUMBER)
            luaL_error(L, "%s: header '%s' must be a string or number, not %s", what,
                       lua_tostring(L, -2), lua_typename(L, vt));
        size_t nl, vl;
        lua_tolstring(L, -2, &nl);
        lua_tolstring(L, -1, &vl); /* converts the stack copy of a number, not the table */
        bytes += nl + vl;
        (*n)++;
        lua_pop(L, 1);
    }
    fl_http_header *h = malloc(*n * sizeof *h + bytes + 1);
    if (!h) luaL_error(L, "%s: out of memory", what);
    char *p = (char *)(h + *n);
    int i = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        size_t nl, vl;
        const char *name = lua_tolstring(L, -2, &nl), *value = lua_tolstring(L, -1, &vl);
        h[i] = (fl_http_header){p, p + nl, nl, vl};
        memcpy(p, name, nl);
        memcpy(p + nl, value, vl);
        p += nl + vl;
        i++;
        lua_pop(L, 1);
    }
    return h;
}

double fl_http_opt_num(lua_State *L, int idx, const char *k, double def, double lo, double hi) {
    if (lua_isnoneornil(L, idx)) return def;
    lua_getfield(L, idx, k);
    double v = def;
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TNUMBER) luaL_error(L, "option '%s' must be a number", k);
        v = lua_tonumber(L, -1);
        if (!(v >= lo && v <= hi)) luaL_error(L, "option '%s' must be in [%g, %g], got %g", k, lo, hi, v);
    }
    lua_pop(L, 1);
    return v;
}

static void wake(struct ev_loop *loop, ev_timer *w, int revents) {}

void fl_http_turn(lua_State *L, struct ev_loop *loop, int idle) {
    double timeout = luaL_optnumber(L, 2, 0);
    if (!(timeout >= 0)) luaL_error(L, "poll: timeout must be >= 0 seconds, got %f", timeout);
    ev_now_update(loop);
    if (timeout > 0 && idle) {
        ev_timer t; /* ends the wait when nothing else does */
        ev_timer_init(&t, wake, timeout, 0);
        ev_timer_start(loop, &t);
        ev_run(loop, EVRUN_ONCE);
        ev_timer_stop(loop, &t);
    } else {
        ev_run(loop, EVRUN_NOWAIT);
    }
}

/* ---- Lua: server ---- */

static server **check_server_ud(lua_State *L) {
    return luaL_checkudata(L, 1, SERVER_MT);
}

static server *check_server(lua_State *L) {
    server *s = *check_server_ud(L);
    if (!s) luaL_error(L, "http server is closed");
    return s;
}

static void server_free(server *s) {
    while (s->all) {
        s->all->busy = 0; /* no events: the server is going away */
        conn_close(s->all);
    }
    for (size_t i = 0; i < s->nev; i++) fl_http_request_free(s->evq[i].req);
    free(s->evq);
    if (s->fd >= 0) {
        ev_io_stop(s->loop, &s->lio);
        close(s->fd);
    }
    ev_timer_stop(s->loop, &s->accept_pause);
    ev_loop_destroy(s->loop);
    free(s->scratch);
    free(s);
}

/* Binds and listens; returns the fd or -1 with msg filled. */
static int listen_on(const char *host, int port, int backlog, int *bound, char *msg, size_t n) {
    struct addrinfo hints = {0}, *res, *ai;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    char service[16];
    snprintf(service, sizeof service, "%d", port);
    int rc = getaddrinfo(host, service, &hints, &res);
    if (rc) {
        snprintf(msg, n, "cannot resolve '%s': %s", host, gai_strerror(rc));
        return -1;
    }
    int fd = -1, err = 0;
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) {
            err = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, backlog) == 0) break;
        err = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        snprintf(msg, n, "cannot listen on %s:%d: %s", host, port, strerror(err));
        return -1;
    }
    struct sockaddr_storage a;
    socklen_t alen = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &alen);
    *bound = ntohs(a.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&a)->sin6_port
                                           : ((struct sockaddr_in *)&a)->sin_port);
    return fd;
}

static int l_listen(lua_State *L) {
    if (!lua_isnoneornil(L, 1)) luaL_checktype(L, 1, LUA_TTABLE);
    const char *host = "127.0.0.1";
    if (lua_istable(L, 1)) {
        lua_getfield(L, 1, "host");
        if (!lua_isnil(L, -1)) {
            if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "option 'host' must be a string");
            host = lua_tostring(L, -1);
        }
        lua_pop(L, 1); /* the options table keeps the string alive */
    }
    int port = (int)fl_http_opt_num(L, 1, "port", 0, 0, 65535);
    int backlog = (int)fl_http_opt_num(L, 1, "backlog", 128, 1, 65535);
    double mh = fl_http_opt_num(L, 1, "max_header_bytes", 16384, 256, 1 << 30);
    double mb = fl_http_opt_num(L, 1, "max_body_bytes", 8 << 20, 0, 1e15);
    double mc = fl_http_opt_num(L, 1, "max_connections", 256, 1, 1 << 20);
    double idle = fl_http_opt_num(L, 1, "idle_timeout", 30, 0.001, 1e9);
    double req = fl_http_opt_num(L, 1, "request_timeout", 10, 0.001, 1e9);
    double mo = fl_http_opt_num(L, 1, "max_output_bytes", 16 << 20, 1, 1e15);

    server *s = calloc(1, sizeof *s);
    char *scratch = malloc(READ_CHUNK);
    struct ev_loop *loop = s && scratch ? ev_loop_new(EVFLAG_AUTO) : NULL;
    if (!loop) {
        free(s);
        free(scratch);
        lua_pushnil(L);
        lua_pushstring(L, "cannot create the event loop");
        return 2;
    }
    char msg[256];
    int bound = 0;
    int fd = listen_on(host, port, backlog, &bound, msg, sizeof msg);
    if (fd < 0) {
        ev_loop_destroy(loop);
        free(s);
        free(scratch);
        lua_pushnil(L);
        lua_pushstring(L, msg);
        return 2;
    }
    /* The parser has its own head limit (80 KiB by default); it must not be the smaller. */
    static uint32_t parser_max_header = 80 * 1024;
    if (mh > parser_max_header) {
        parser_max_header = (uint32_t)mh;
        http_parser_set_max_header_size(parser_max_header);
    }
    s->loop = loop;
    s->scratch = scratch;
    s->fd = fd;
    s->port = bound;
    s->lim.max_header_bytes = (size_t)mh;
    s->lim.max_body_bytes = (size_t)mb;
    s->max_conns = (size_t)mc;
    s->idle_timeout = idle;
    s->request_timeout = req;
    s->max_output = (size_t)mo;
    ev_io_init(&s->lio, accept_cb, fd, EV_READ);
    s->lio.data = s;
    ev_io_start(loop, &s->lio);
    ev_timer_init(&s->accept_pause, accept_resume_cb, 0, 0);
    s->accept_pause.data = s;

    server **ud = lua_newuserdata(L, sizeof *ud);
    *ud = s;
    luaL_getmetatable(L, SERVER_MT);
    lua_setmetatable(L, -2);
    return 1;
}

static void push_request(lua_State *L, const event *e) {
    const fl_http_request *r = e->req;
    lua_createtable(L, 0, 10);
    lua_pushliteral(L, "request");
    lua_setfield(L, -2, "kind");
    lua_pushnumber(L, (lua_Number)e->conn);
    lua_setfield(L, -2, "conn");
    lua_pushstring(L, http_method_str((enum http_method)r->method));
    lua_setfield(L, -2, "method");
    const char *path, *query;
    size_t pl, ql;
    fl_http_request_target(r, &path, &pl, &query, &ql);
    lua_pushlstring(L, path, pl);
    lua_setfield(L, -2, "path");
    lua_pushlstring(L, query, ql);
    lua_setfield(L, -2, "query");
    fl_http_push_headers(L, &r->headers);
    lua_setfield(L, -2, "headers");
    lua_pushlstring(L, r->body.len ? r->body.data : "", r->body.len);
    lua_setfield(L, -2, "body");
    lua_pushfstring(L, "%d.%d", r->http_major, r->http_minor);
    lua_setfield(L, -2, "http_version");
    lua_pushstring(L, e->remote);
    lua_setfield(L, -2, "remote");
}

static int l_poll(lua_State *L) {
    server *s = check_server(L);
    fl_http_turn(L, s->loop, s->nev == 0);
    lua_createtable(L, (int)s->nev, 0);
    for (size_t i = 0; i < s->nev; i++) {
        event *e = &s->evq[i];
        if (e->kind == EV_REQUEST) {
            push_request(L, e);
            fl_http_request_free(e->req);
            e->req = NULL;
        } else {
            lua_createtable(L, 0, 2);
            lua_pushliteral(L, "closed");
            lua_setfield(L, -2, "kind");
            lua_pushnumber(L, (lua_Number)e->conn);
            lua_setfield(L, -2, "conn");
        }
        lua_rawseti(L, -2, (int)i + 1);
    }
    s->nev = 0;
    return 1;
}

/* The connection named by argument 2; NULL when it is gone (ids are never reused). */
static conn *check_conn(lua_State *L, server *s) {
    lua_Number id = luaL_checknumber(L, 2);
    if (id < 1 || id != (lua_Number)(uint64_t)id) luaL_error(L, "bad connection id %f", id);
    return find_conn(s, (uint64_t)id);
}

/* A response is finished: parse any pipelined request already buffered. */
static int after_response(conn *c) {
    c->busy = 0;
    if (c->h.state == FL_HC_READING) parsed(c, fl_http_conn_parse(&c->h));
    return conn_service(c);
}

static int l_respond(lua_State *L) {
    server *s = check_server(L);
    conn *c = check_conn(L, s);
    int status = (int)luaL_checkinteger(L, 3);
    size_t len = 0;
    const char *body = lua_isnoneornil(L, 5) ? "" : luaL_checklstring(L, 5, &len);
    if (!c) {
        lua_pushboolean(L, 0);
        return 1;
    }
    if (!c->busy) luaL_error(L, "respond: connection %f has no request awaiting a response", (lua_Number)c->id);
    int nh;
    fl_http_header *h = fl_http_check_headers(L, 4, "respond", &nh);
    char msg[256];
    int rc = fl_http_conn_respond(&c->h, status, h, nh, body, len, msg, sizeof msg);
    free(h);
    if (rc) luaL_error(L, "respond: %s", msg);
    ev_now_update(s->loop);
    lua_pushboolean(L, after_response(c) == 0);
    return 1;
}

static int l_start_stream(lua_State *L) {
    server *s = check_server(L);
    conn *c = check_conn(L, s);
    int status = (int)luaL_checkinteger(L, 3);
    if (!c) {
        lua_pushboolean(L, 0);
        return 1;
    }
    if (!c->busy || c->h.state != FL_HC_WAITING)
        luaL_error(L, "start_stream: connection %f has no request awaiting a response", (lua_Number)c->id);
    int nh;
    fl_http_header *h = fl_http_check_headers(L, 4, "start_stream", &nh);
    char msg[256];
    int rc = fl_http_conn_start_stream(&c->h, status, h, nh, msg, sizeof msg);
    free(h);
    if (rc) luaL_error(L, "start_stream: %s", msg);
    ev_now_update(s->loop);
    lua_pushboolean(L, conn_service(c) == 0);
    return 1;
}

static int l_write(lua_State *L) {
    server *s = check_server(L);
    conn *c = check_conn(L, s);
    size_t len;
    const char *data = luaL_checklstring(L, 3, &len);
    if (!c) {
        lua_pushboolean(L, 0);
        return 1;
    }
    if (c->h.state != FL_HC_STREAMING)
        luaL_error(L, "write: connection %f has no stream started", (lua_Number)c->id);
    if (fl_http_conn_write(&c->h, data, len)) {
        conn_close(c); /* out of memory for its output */
        lua_pushboolean(L, 0);
        return 1;
    }
    ev_now_update(s->loop);
    lua_pushboolean(L, conn_service(c) == 0);
    return 1;
}

static int l_finish(lua_State *L) {
    server *s = check_server(L);
    conn *c = check_conn(L, s);
    if (!c) {
        lua_pushboolean(L, 0);
        return 1;
    }
    if (c->h.state != FL_HC_STREAMING)
        luaL_error(L, "finish: connection %f has no stream started", (lua_Number)c->id);
    if (fl_http_conn_finish(&c->h)) {
        c->busy = 0;
        conn_close(c);
        lua_pushboolean(L, 0);
        return 1;
    }
    ev_now_update(s->loop);
    lua_pushboolean(L, after_response(c) == 0);
    return 1;
}

static int l_port(lua_State *L) {
    lua_pushinteger(L, check_server(L)->port);
    return 1;
}

static int l_stats(lua_State *L) {
    server *s = check_server(L);
    lua_createtable(L, 0, 4);
    lua_pushnumber(L, (lua_Number)s->n_open);
    lua_setfield(L, -2, "connections");
    lua_pushnumber(L, (lua_Number)s->accepted);
    lua_setfield(L, -2, "accepted");
    lua_pushnumber(L, (lua_Number)s->requests);
    lua_setfield(L, -2, "requests");
    lua_pushnumber(L, (lua_Number)s->rejected);
    lua_setfield(L, -2, "rejected");
    return 1;
}

static int l_close(lua_State *L) {
    server **ud = check_server_ud(L);
    if (*ud) server_free(*ud);
    *ud = NULL;
    return 0;
}

static int l_tostring(lua_State *L) {
    server *s = *check_server_ud(L);
    if (s) lua_pushfstring(L, "flexllm.http server (port %d)", s->port);
    else lua_pushliteral(L, "flexllm.http server (closed)");
    return 1;
}

int luaopen_flexllm_http(lua_State *L) {
    static const luaL_Reg methods[] = {
        {"poll", l_poll},       {"respond", l_respond}, {"start_stream", l_start_stream},
        {"write", l_write},     {"finish", l_finish},   {"port", l_port},
        {"stats", l_stats},     {"close", l_close},     {NULL, NULL},
    };
    luaL_newmetatable(L, SERVER_MT);
    lua_pushvalue(L, -1);
    lua_setfield(L, -2, "__index");
    luaL_register(L, NULL, methods);
    lua_pushcfunction(L, l_close);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, l_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pop(L, 1);

    lua_newtable(L);
    lua_pushcfunction(L, l_listen);
    lua_setfield(L, -2, "listen");
    fl_http_client_register(L);
    return 1;
}
