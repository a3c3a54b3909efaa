-- flexllm.server.reply: JSON in and out for the server's routes, OpenAI-style errors, and
-- checks of request fields that raise those errors.
--
-- A route raises an error with M.fail (or a check below); the router catches it and
-- answers { "error": { message, type, param, code } } with its status. Anything else a
-- route raises is a bug, answered as a 500 without taking the server down.
local cjson = require "cjson.safe"

local M = {}

-- Our own instance: settings here do not leak into other users of cjson.
local json = cjson.new()
json.decode_invalid_numbers(false) -- NaN, Infinity and hex are not JSON
json.encode_invalid_numbers(false)
json.decode_max_depth(64)
M.null = json.null

-- cjson encodes an empty table as {}; lists that may be empty go through M.array, which
-- stands in a marker that M.encode turns into [].
local EMPTY = "\1flexllm-empty-array\1"
local EMPTY_PATTERN = json.encode(EMPTY):gsub("%p", "%%%0")

function M.array(t)
  if next(t) == nil then return EMPTY end
  return t
end

-- Encodes v; numbers that JSON cannot hold (NaN, inf) must have been replaced before.
function M.encode(v)
  local s, err = json.encode(v)
  if not s then error("cannot encode the response as JSON: " .. tostring(err)) end
  return (s:gsub(EMPTY_PATTERN, "[]"))
end

-- A finite number, or null.
function M.finite(x)
  if type(x) ~= "number" or x ~= x or x == math.huge or x == -math.huge then return M.null end
  return x
end

local ErrorMT = {}

-- Raises an OpenAI-style error for the router to answer. code: a short machine-readable
-- reason (or nil); param: the request field at fault (or nil).
function M.fail(status, message, param, code)
  error(setmetatable({ status = status, message = message, param = param, code = code }, ErrorMT), 0)
end

function M.is_error(e) return getmetatable(e) == ErrorMT end

-- The body of an error answer. (The C layer's own errors, engine/http/http_conn.c, have
-- the same shape and types.)
function M.error_body(status, message, param, code)
  local kind = status >= 500 and "server_error" or "invalid_request_error"
  return M.encode({ error = { message = message, type = kind, param = param or M.null, code = code or M.null } })
end

local JSON_HEADERS = { ["content-type"] = "application/json" }

function M.send_json(w, status, v)
  w:respond(status, JSON_HEADERS, M.encode(v))
end

function M.send_error(w, status, message, param, code, headers)
  local h = { ["content-type"] = "application/json" }
  for k, v in pairs(headers or {}) do h[k] = v end
  w:respond(status, h, M.error_body(status, message, param, code))
end

local function is_int(v) return type(v) == "number" and v == math.floor(v) and v > -2^53 and v < 2^53 end
-- cjson decodes {} and [] alike, as an empty table: either passes for both.
local function is_object(v) return type(v) == "table" and (next(v) == nil or v[1] == nil) end
local function is_array(v) return type(v) == "table" and (next(v) == nil or v[1] ~= nil) end
M.is_int, M.is_object, M.is_array = is_int, is_object, is_array

-- The request body as a JSON object, or a 400 naming what is wrong.
-- (Any Content-Type: curl -d sends form-urlencoded by default, and the body says enough.)
function M.json_body(req)
  if req.body == nil or req.body == "" then M.fail(400, "the request body is empty; expected a JSON object") end
  local v, err = json.decode(req.body)
  if v == nil then M.fail(400, "the body is not valid JSON: " .. tostring(err), nil, "invalid_json") end
  if not is_object(v) then M.fail(400, "the body must be a JSON object, got " .. M.json_type(v)) end
  return v
end

function M.decode(s) return json.decode(s) end

-- The JSON type name of a decoded value, for messages.
function M.json_type(v)
  if v == json.null then return "null" end
  local t = type(v)
  if t == "table" then
    if next(v) == nil then return "an empty object or array" end
    return v[1] ~= nil and "an array" or "an object"
  end
  if t == "number" then return "a number" end
  if t == "boolean" then return "a boolean" end
  return "a string"
end

-- Field checks: each returns the value (nil when absent or null; def if given) or raises a
-- 400 naming the field. name is the field's path for messages ("messages[2].role").
local function check(what, ok)
  return function(t, key, def, name)
    local v = t[key]
    if v == nil or v == json.null then return def end
    if not ok(v) then
      M.fail(400, ("'%s' must be %s, got %s"):format(name or key, what, M.json_type(v)), name or key, "invalid_type")
    end
    return v
  end
end

M.string = check("a string", function(v) return type(v) == "string" end)
M.number = check("a number", function(v) return type(v) == "number" end)
M.integer = check("an integer", is_int)
M.boolean = check("a boolean", function(v) return type(v) == "boolean" end)
local object, list = check("an object", is_object), check("an array", is_array)
function M.object(t, key, name) return object(t, key, nil, name) end
function M.list(t, key, name) return list(t, key, nil, name) end

-- A number in [lo, hi] (either bound may be nil).
function M.range(name, v, lo, hi)
  if v == nil then return nil end
  if (lo and v < lo) or (hi and v > hi) then
    local want = lo and hi and ("between %s and %s"):format(lo, hi)
      or lo and ("at least %s"):format(lo) or ("at most %s"):format(hi)
    M.fail(400, ("'%s' must be %s, got %s"):format(name, want, tostring(v)), name, "invalid_value")
  end
  return v
end

return M
