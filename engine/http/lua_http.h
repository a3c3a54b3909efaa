/* Internals shared by the server and client halves of the flexllm.http module. */
#ifndef FL_LUA_HTTP_H
#define FL_LUA_HTTP_H

#include "http_conn.h"

#include <ev.h>
#include <lua.h>

/* Pushes a table of "name\0value\0" pairs; a repeated name gets its values joined with ", ". */
void fl_http_push_headers(lua_State *L, const fl_buf *pairs);
/* Copies the table at idx (name -> string or number; nil or none for no headers) into
 * one allocation, the array followed by the strings, which the caller frees.
 * Raises a Lua error naming `what` when an entry is of another type. */
fl_http_header *fl_http_check_headers(lua_State *L, int idx, const char *what, int *n);
/* Optional numeric field of the options table at idx, checked against [lo, hi]. */
double fl_http_opt_num(lua_State *L, int idx, const char *k, double def, double lo, double hi);

/* One turn of a loop for poll(timeout): handles what is ready, and when `idle` (no
 * events queued for Lua) waits up to timeout seconds (argument 2, default 0) for one. */
void fl_http_turn(lua_State *L, struct ev_loop *loop, int idle);

void fl_http_client_register(lua_State *L); /* sets module.client at the table on top */

#endif
