-- flexllm.server.files: training files. Uploads come as multipart/form-data (what the
-- openai package sends for files.create), are checked line by line as finetuning JSONL,
-- and are kept under the data dir as <id>.jsonl; their records live in memory.
local R = require "flexllm.server.reply"

local M = {}

local function header_param(value, key)
  -- key=value or key="quoted value" in a header such as Content-Disposition
  local q = value:match(";%s*" .. key .. '%s*=%s*"([^"]*)"')
  if q then return q end
  return value:match(";%s*" .. key .. "%s*=%s*([^;%s]+)")
end

-- Parses a multipart/form-data body. content_type: the request's Content-Type. Returns a
-- list of parts { name, filename, content_type, data }, or nil and what is wrong.
function M.parse_multipart(content_type, body)
  if not content_type or not content_type:lower():match("^%s*multipart/form%-data") then
    return nil, ("expected Content-Type: multipart/form-data, got %s"):format(tostring(content_type))
  end
  local boundary = header_param(content_type, "boundary")
  if not boundary or boundary == "" then return nil, "the multipart Content-Type has no boundary" end
  local delim = "--" .. boundary
  local pos = 1
  -- the body starts with the first delimiter (a preamble before it is allowed)
  local s, e = body:find(delim, pos, true)
  if not s then return nil, "the multipart body does not contain its boundary" end
  pos = e + 1
  local parts = {}
  while true do
    if body:sub(pos, pos + 1) == "--" then return parts end -- the closing delimiter
    local line_end = body:find("\r\n", pos, true)
    if not line_end then return nil, ("multipart part %d: the delimiter line is not terminated"):format(#parts + 1) end
    pos = line_end + 2
    local head_end = body:find("\r\n\r\n", pos, true)
    local head
    if body:sub(pos, pos + 1) == "\r\n" then -- a part without headers
      head, head_end = "", pos - 2
    elseif not head_end then
      return nil, ("multipart part %d: its headers do not end with a blank line"):format(#parts + 1)
    else
      head = body:sub(pos, head_end - 1)
    end
    local data_start = head_end + 4
    local ds, de = body:find("\r\n" .. delim, data_start, true)
    if not ds then
      return nil, ("multipart part %d: no closing boundary after its data (the body is cut short?)")
        :format(#parts + 1)
    end
    local part = { data = body:sub(data_start, ds - 1) }
    for line in (head .. "\r\n"):gmatch("(.-)\r\n") do
      local k, v = line:match("^([^:]+):%s*(.*)$")
      if k then
        k = k:lower()
        if k == "content-disposition" then
          part.name = header_param(v, "name")
          part.filename = header_param(v, "filename")
        elseif k == "content-type" then
          part.content_type = v
        end
      end
    end
    if not part.name then
      return nil, ("multipart part %d: its Content-Disposition has no name"):format(#parts + 1)
    end
    parts[#parts + 1] = part
    pos = de + 1
  end
end

local ROLES = { system = true, user = true, assistant = true }

local function check_messages(msgs)
  if not R.is_array(msgs) then return "'messages' must be an array" end
  if #msgs == 0 then return "'messages' is empty" end
  local learn = false
  for i, m in ipairs(msgs) do
    local where = ("messages[%d]"):format(i - 1)
    if not R.is_object(m) then return where .. " must be an object" end
    if type(m.role) ~= "string" then return where .. ".role must be a string" end
    if not ROLES[m.role] then
      return ("%s.role '%s' is not one of system, user, assistant"):format(where, m.role)
    end
    if type(m.content) ~= "string" then return where .. ".content must be a string" end
    learn = learn or m.role == "assistant"
  end
  if not learn then return "'messages' has no assistant message: there is nothing to learn from" end
  return nil
end

-- What is wrong with one decoded JSONL line, or nil.
local function check_example(v)
  if not R.is_object(v) then return "expected a JSON object, got " .. R.json_type(v) end
  local shapes = (v.text ~= nil and 1 or 0) + ((v.prompt ~= nil or v.completion ~= nil) and 1 or 0)
    + (v.messages ~= nil and 1 or 0)
  if shapes == 0 then return "expected \"messages\", \"prompt\" and \"completion\", or \"text\"" end
  if shapes > 1 then return "use one of \"messages\", \"prompt\"/\"completion\" or \"text\" per line, not several" end
  if v.messages ~= nil then return check_messages(v.messages) end
  if v.text ~= nil then
    if type(v.text) ~= "string" then return "'text' must be a string" end
    if v.text == "" then return "'text' is empty" end
    return nil
  end
  if type(v.prompt) ~= "string" then return "'prompt' must be a string" end
  if type(v.completion) ~= "string" then return "'completion' must be a string" end
  return nil
end

-- Checks finetuning JSONL. Returns the number of examples, or nil and a message naming
-- the first bad line.
function M.validate_jsonl(text)
  local n, lineno = 0, 0
  for line in (text .. "\n"):gmatch("(.-)\r?\n") do
    lineno = lineno + 1
    if line:find("%S") then
      local v, err = R.decode(line)
      local why
      if v == nil then why = "invalid JSON: " .. tostring(err) else why = check_example(v) end
      if why then return nil, ("line %d: %s"):format(lineno, why) end
      n = n + 1
    end
  end
  if n == 0 then return nil, "the file holds no examples (every line is blank)" end
  return n
end

local Store = {}
Store.__index = Store

-- dir: where uploads are written (made if missing).
function M.store(dir, new_id, now)
  return setmetatable({ dir = dir, new_id = new_id, now = now or os.time, files = {}, order = {} }, Store)
end

local function write_file(path, data)
  local f, err = io.open(path, "wb")
  if not f then return nil, err end
  local ok, werr = f:write(data)
  f:close()
  if not ok then os.remove(path) return nil, werr end
  return true
end

function Store:path(id) return ("%s/%s.jsonl"):format(self.dir, id) end

function Store:get(id) return self.files[id] end

-- POST /v1/files
function Store:upload(req, w)
  local parts, err = M.parse_multipart(req.headers["content-type"], req.body or "")
  if not parts then R.fail(400, "cannot read the upload: " .. err) end
  local purpose, file
  for _, p in ipairs(parts) do
    if p.name == "purpose" then purpose = p.data
    elseif p.name == "file" then file = p end
  end
  if not file then R.fail(400, "the upload has no 'file' part", "file") end
  if purpose == nil then R.fail(400, "the upload has no 'purpose' part; use purpose=fine-tune", "purpose") end
  if purpose ~= "fine-tune" then
    R.fail(400, ("'purpose' must be 'fine-tune' (this server stores training files), got '%s'"):format(purpose),
      "purpose")
  end
  local n, verr = M.validate_jsonl(file.data)
  local name = file.filename or "upload.jsonl"
  if not n then R.fail(400, ("invalid training file %s: %s"):format(name, verr), "file", "invalid_file") end
  local id = self.new_id("file")
  local ok, werr = write_file(self:path(id), file.data)
  if not ok then R.fail(500, "cannot store the file: " .. tostring(werr)) end
  local rec = { id = id, object = "file", bytes = #file.data, created_at = self.now(), filename = name,
                purpose = purpose, status = "processed", status_details = R.null, examples = n }
  self.files[id] = rec
  self.order[#self.order + 1] = id
  R.send_json(w, 200, rec)
end

function Store:list(req, w)
  local data = {}
  for i = #self.order, 1, -1 do data[#data + 1] = self.files[self.order[i]] end
  R.send_json(w, 200, { object = "list", data = R.array(data), has_more = false })
end

local function find(self, id)
  local rec = self.files[id]
  if not rec then R.fail(404, ("no such file: '%s'"):format(id), "file_id", "not_found") end
  return rec
end

function Store:retrieve(req, w, id) R.send_json(w, 200, find(self, id)) end

function Store:content(req, w, id)
  find(self, id)
  local f = io.open(self:path(id), "rb")
  if not f then R.fail(500, ("the stored bytes of %s are gone from %s"):format(id, self.dir)) end
  local data = f:read("*a")
  f:close()
  w:respond(200, { ["content-type"] = "application/jsonl" }, data)
end

function Store:delete(req, w, id)
  find(self, id)
  os.remove(self:path(id))
  self.files[id] = nil
  for i, v in ipairs(self.order) do if v == id then table.remove(self.order, i) break end end
  R.send_json(w, 200, { id = id, object = "file", deleted = true })
end

return M
