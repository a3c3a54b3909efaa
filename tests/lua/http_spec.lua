-- flexllm.http in one process: a server and a client polled in turn. Keep-alive,
-- pipelining and the errors answered by the C layer are checked over raw sockets
-- by tests/integration/http.sh.
local http = require "flexllm.http"
local cjson = require "cjson"

-- Polls server and client in turn until `done()` or 2000 rounds; server events go
-- to on_request(e) / on_closed(e); client events are collected per request id.
local function pump(srv, cl, on_request, done, on_closed)
  local got = {}
  for _ = 1, 2000 do
    for _, e in ipairs(srv:poll(0.001)) do
      if e.kind == "request" then on_request(e) elseif on_closed then on_closed(e) end
    end
    for _, e in ipairs(cl:poll(0.001)) do
      local r = got[e.req] or { data = {}, kinds = {} }
      got[e.req] = r
      r.kinds[#r.kinds + 1] = e.kind
      if e.kind == "head" then r.status, r.headers = e.status, e.headers end
      if e.kind == "data" then r.data[#r.data + 1] = e.data end
      if e.kind == "error" then r.error = e.message end
    end
    if done(got) then return got end
  end
  error("no progress after 2000 rounds")
end

local function body(r) return table.concat(r.data) end

describe("flexllm.http", function()
  local srv, cl
  before_each(function()
    srv = assert(http.listen({ host = "127.0.0.1", port = 0 }))
    cl = http.client()
  end)
  after_each(function()
    srv:close()
    cl:close()
  end)

  local function req(t)
    t.host, t.port = "127.0.0.1", srv:port()
    return cl:request(t)
  end
  local function all_done() return cl:active() == 0 end

  it("listens on an ephemeral port", function()
    assert.is_true(srv:port() > 0)
    assert.are.same({ connections = 0, accepted = 0, requests = 0, rejected = 0 }, srv:stats())
  end)

  it("round-trips a GET and a POST with headers and body both ways", function()
    local seen = {}
    local post_body = ("0123456789abcdef"):rep(8192) .. "\0\255 end" -- 128 KiB, binary
    local get = req({ path = "/v1/models?limit=3", headers = { ["X-Trace"] = "t1" } })
    local post = req({ method = "POST", path = "/v1/completions", body = post_body,
                       headers = { ["Content-Type"] = "application/json", ["X-Num"] = 42 } })
    local got = pump(srv, cl, function(e)
      seen[e.path] = e
      srv:respond(e.conn, 200, { ["Content-Type"] = "text/plain", ["X-Echo"] = e.method },
                  e.method .. " " .. e.path .. "?" .. e.query .. " " .. #e.body .. " " .. e.body:sub(-6))
    end, all_done)

    local g, p = seen["/v1/models"], seen["/v1/completions"]
    assert.are.equal("GET", g.method)
    assert.are.equal("limit=3", g.query)
    assert.are.equal("t1", g.headers["x-trace"])
    assert.are.equal("", g.body)
    assert.are.equal("1.1", g.http_version)
    assert.matches("^127%.0%.0%.1:%d+$", g.remote)
    assert.are.equal("POST", p.method)
    assert.are.equal(post_body, p.body)
    assert.are.equal("application/json", p.headers["content-type"])
    assert.are.equal("42", p.headers["x-num"])
    assert.are_not.equal(g.conn, p.conn)

    assert.are.same({ "head", "data", "done" }, got[get].kinds)
    assert.are.equal(200, got[get].status)
    assert.are.equal("GET", got[get].headers["x-echo"])
    assert.are.equal("GET /v1/models?limit=3 0 ", body(got[get]))
    assert.are.equal("POST /v1/completions? " .. #post_body .. " \0\255 end", body(got[post]))
    assert.are.equal(tostring(#body(got[post])), got[post].headers["content-length"])
    assert.are.equal(2, srv:stats().requests)
  end)

  it("sends a long request target whole", function()
    local path = "/" .. ("segment/"):rep(250) -- 2 KB, far longer than a status or header line
    local seen
    local id = req({ path = path .. "?q=" .. ("v"):rep(1000) })
    local got = pump(srv, cl, function(e)
      seen = e
      srv:respond(e.conn, 200, {}, "ok")
    end, all_done)
    assert.are.equal(200, got[id].status)
    assert.are.equal(path, seen.path)
    assert.are.equal("q=" .. ("v"):rep(1000), seen.query)
  end)

  it("delivers a chunked stream as several data events before done", function()
    local parts = { "data: one\n\n", "data: two\n\n", "data: three\n\n", "data: [DONE]\n\n" }
    local streams = {}
    local id = req({ path = "/stream" })
    local got = pump(srv, cl, function(e)
      assert.is_true(srv:start_stream(e.conn, 200, { ["Content-Type"] = "text/event-stream" }))
      streams[#streams + 1] = { conn = e.conn, i = 0 }
    end, function(g)
      -- one part per round, so the parts reach the client separately
      for _, s in ipairs(streams) do
        if s.i < #parts then
          s.i = s.i + 1
          assert.is_true(srv:write(s.conn, parts[s.i]))
          if s.i == #parts then assert.is_true(srv:finish(s.conn)) end
        end
      end
      return all_done()
    end)
    local r = got[id]
    assert.are.equal("chunked", r.headers["transfer-encoding"])
    assert.are.equal("text/event-stream", r.headers["content-type"])
    assert.are.same(parts, r.data)
    assert.are.same({ "head", "data", "data", "data", "data", "done" }, r.kinds)
  end)

  it("sends a response larger than the socket buffers whole", function()
    local big = {}
    for i = 1, 200000 do big[i] = string.format("%07d\n", i) end -- 1.6 MB
    big = table.concat(big)
    local id = req({ path = "/big" })
    local got = pump(srv, cl, function(e) srv:respond(e.conn, 200, {}, big) end, all_done)
    assert.are.equal(#big, #body(got[id]))
    assert.is_true(body(got[id]) == big)
    assert.is_true(#got[id].data > 1) -- it came in pieces
  end)

  it("answers a body over max_body_bytes with a 413 JSON error before reading it", function()
    local small = assert(http.listen({ port = 0, max_body_bytes = 1000 }))
    local id = cl:request({ host = "127.0.0.1", port = small:port(), method = "POST", path = "/",
                            body = ("x"):rep(2 * 1024 * 1024) })
    local got = pump(srv, cl, function() end, function()
      assert.are.same({}, small:poll(0))
      return all_done()
    end)
    small:close()
    assert.are.equal(413, got[id].status)
    assert.are.equal("application/json", got[id].headers["content-type"])
    local err = cjson.decode(body(got[id])).error
    assert.are.equal("request body of 2097152 bytes (Content-Length) is larger than the limit of 1000 bytes",
                     err.message)
    assert.are.equal("invalid_request_error", err.type)
    assert.are.equal(cjson.null, err.param)
    assert.are.equal(cjson.null, err.code)
  end)

  it("passes a 404 from Lua with its body", function()
    local id = req({ path = "/nope" })
    local got = pump(srv, cl, function(e)
      srv:respond(e.conn, 404, { ["Content-Type"] = "application/json" },
                  '{"error":{"message":"no route ' .. e.path .. '"}}')
    end, all_done)
    assert.are.equal(404, got[id].status)
    assert.are.equal('{"error":{"message":"no route /nope"}}', body(got[id]))
  end)

  it("gives an error event for a closed port", function()
    local probe = assert(http.listen({ port = 0 }))
    local port = probe:port()
    probe:close() -- nothing listens there now
    local id = cl:request({ host = "127.0.0.1", port = port, path = "/" })
    local got = pump(srv, cl, function() end, all_done)
    assert.are.same({ "error" }, got[id].kinds)
    assert.matches("connect to 127.0.0.1:" .. port .. ": Connection refused", got[id].error, 1, true)
  end)

  it("tells Lua when a client goes away mid-stream; writes then return false", function()
    local conn, closed
    req({ path = "/stream" })
    pump(srv, cl, function(e)
      conn = e.conn
      srv:start_stream(e.conn, 200, {})
      srv:write(e.conn, "first")
    end, function(g)
      for _, r in pairs(g) do if #r.data > 0 then return true end end
    end)
    cl:close() -- the client goes away
    cl = http.client()
    for _ = 1, 2000 do
      for _, e in ipairs(srv:poll(0.001)) do
        if e.kind == "closed" then closed = e.conn end
      end
      if closed then break end
    end
    assert.are.equal(conn, closed)
    assert.is_false(srv:write(conn, "more"))
    assert.is_false(srv:finish(conn))
    assert.is_false(srv:respond(conn, 200, {}, "late"))
    -- and it serves the next client
    local id = req({ path = "/next" })
    local got = pump(srv, cl, function(e) srv:respond(e.conn, 200, {}, "ok") end, all_done)
    assert.are.equal("ok", body(got[id]))
  end)

  it("refuses misuse with errors that say what is wrong", function()
    local id = req({ path = "/x" })
    local conn
    pump(srv, cl, function(e)
      conn = e.conn
      assert.has_error(function() srv:write(e.conn, "x") end,
        "write: connection " .. e.conn .. " has no stream started")
      assert.has_error(function() srv:respond(e.conn, 200, { ["Content-Length"] = "3" }, "abc") end,
        "respond: header 'Content-Length' is set by the server itself")
      assert.has_error(function() srv:respond(e.conn, 200, { ["X-Bad"] = "a\r\nb" }, "") end,
        "respond: header 'X-Bad' has a CR, LF or NUL in its value")
      assert.has_error(function() srv:respond(e.conn, 99, {}, "") end,
        "respond: status 99 is not a final HTTP status (200-599)")
      assert.has_error(function() srv:respond(e.conn, 204, {}, "body") end,
        "respond: status 204 has no body")
      srv:respond(e.conn, 200, {}, "fine")
      assert.has_error(function() srv:respond(e.conn, 200, {}, "again") end,
        "respond: connection " .. e.conn .. " has no request awaiting a response")
    end, all_done)
    assert.is_number(conn)
    assert.is_false(srv:respond(12345, 200, {}, "")) -- an id never given out
    assert.has_error(function() cl:request({ port = 1 }) end, "request: 'host' is required")
    assert.has_error(function() cl:request({ host = "h", path = "no-slash" }) end,
      "request: path 'no-slash' must start with '/'")
    assert.has_error(function() cl:request({ host = "h", headers = { ["Content-Length"] = 1 } }) end,
      "request: header 'Content-Length' is set by the client itself")
    assert.has_error(function() http.listen({ port = 70000 }) end,
      "option 'port' must be in [0, 65535], got 70000")
    local taken, err = http.listen({ port = srv:port() })
    assert.is_nil(taken)
    assert.matches("cannot listen on 127.0.0.1:" .. srv:port() .. ": Address already in use", err, 1, true)
    srv:close()
    assert.has_error(function() srv:poll(0) end, "http server is closed")
    srv = assert(http.listen({ port = 0 })) -- for after_each
    assert.is_number(id)
  end)

  it("runs two servers on their own loops side by side", function()
    local other = assert(http.listen({ port = 0 }))
    local a = req({ path = "/a" })
    local b = cl:request({ host = "127.0.0.1", port = other:port(), path = "/b" })
    local got = pump(srv, cl, function(e) srv:respond(e.conn, 200, {}, "srv " .. e.path) end, function()
      for _, e in ipairs(other:poll(0)) do other:respond(e.conn, 200, {}, "other " .. e.path) end
      return all_done()
    end)
    other:close()
    assert.are.equal("srv /a", body(got[a]))
    assert.are.equal("other /b", body(got[b]))
  end)

  it("frees servers and clients left to the garbage collector", function()
    -- Their sockets and event loops are closed: the process holds the descriptors it held before.
    local function open_fds()
      local f = assert(io.open("/proc/self/stat"))
      local pid = f:read("*n")
      f:close()
      local n, ls = 0, assert(io.popen("ls /proc/" .. pid .. "/fd"))
      for _ in ls:lines() do n = n + 1 end
      ls:close()
      return n
    end
    local before = open_fds()
    for _ = 1, 20 do
      local s = assert(http.listen({ port = 0 }))
      local c = http.client()
      c:request({ host = "127.0.0.1", port = s:port(), path = "/" })
      s:poll(0.001)
      c:poll(0)
    end
    collectgarbage()
    collectgarbage()
    assert.are.equal(before, open_fds())
  end)
end)
