-- multipart/form-data parsing (uploads as the openai package sends them) and the check
-- of finetuning JSONL, whose errors name the line.
local files = require "flexllm.server.files"

local CRLF = "\r\n"

-- A multipart body built from parts { name, filename?, content_type?, data }.
local function multipart(boundary, parts, preamble)
  local out = { preamble or "" }
  for _, p in ipairs(parts) do
    out[#out + 1] = "--" .. boundary .. CRLF
    local disp = ('Content-Disposition: form-data; name="%s"'):format(p.name)
    if p.filename then disp = disp .. ('; filename="%s"'):format(p.filename) end
    out[#out + 1] = disp .. CRLF
    if p.content_type then out[#out + 1] = "Content-Type: " .. p.content_type .. CRLF end
    out[#out + 1] = CRLF .. p.data .. CRLF
  end
  out[#out + 1] = "--" .. boundary .. "--" .. CRLF
  return table.concat(out)
end

describe("multipart/form-data", function()
  -- data that looks like boundaries and line breaks, and every byte value
  local bytes = {}
  for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
  -- (a sender picks a boundary its data does not contain; a prefix of it may appear)
  local tricky = "line one\r\n--not-the-boundary\r\n\r\n--b0undar almost\r\n" .. table.concat(bytes)
  local parts = {
    { name = "purpose", data = "fine-tune" },
    { name = "file", filename = "train.jsonl", content_type = "application/octet-stream", data = tricky },
    { name = "empty", data = "" },
  }

  it("returns every part's name, filename, type and exact bytes", function()
    local b = "b0undary"
    local got = assert(files.parse_multipart("multipart/form-data; boundary=" .. b, multipart(b, parts, "preamble\r\n")))
    assert.are.equal(#parts, #got)
    for i, p in ipairs(parts) do
      assert.are.equal(p.name, got[i].name)
      assert.are.equal(p.filename, got[i].filename)
      assert.are.equal(p.content_type, got[i].content_type)
      assert.are.equal(p.data, got[i].data)
    end
  end)

  it("takes a quoted boundary and any case in the type and header names", function()
    local b = "with=equals and space"
    local body = multipart(b, parts):gsub("Content%-Disposition", "content-disposition")
    local got = assert(files.parse_multipart('Multipart/Form-Data; charset=utf-8; boundary="' .. b .. '"', body))
    assert.are.equal(tricky, got[2].data)
    assert.are.equal("train.jsonl", got[2].filename)
  end)

  it("says what is wrong with a broken body", function()
    local b = "xyz"
    local body = multipart(b, parts)
    local cases = {
      { "application/json", body, "expected Content-Type: multipart/form-data" },
      { "multipart/form-data", body, "has no boundary" },
      { "multipart/form-data; boundary=other", body, "does not contain its boundary" },
      { "multipart/form-data; boundary=xyz", body:sub(1, body:find('\r\n--xyz\r\nContent-Disposition: form-data; name="empty"', 1, true) - 1),
        "part 2: no closing boundary" },
      { "multipart/form-data; boundary=xyz", "--xyz\r\nContent-Type: text/plain\r\n\r\nx\r\n--xyz--\r\n",
        "part 1: its Content-Disposition has no name" },
      { "multipart/form-data; boundary=xyz", "--xyz\r\nContent-Disposition: form-data; name=\"a\"", "part 1:" },
    }
    for _, c in ipairs(cases) do
      local got, err = files.parse_multipart(c[1], c[2])
      assert.is_nil(got)
      assert.matches(c[3], err, 1, true)
    end
  end)
end)

describe("finetuning JSONL", function()
  it("counts the examples of every accepted shape, skipping blank lines", function()
    local text = table.concat({
      '{"text": "plain text"}',
      "",
      '{"prompt": "Q", "completion": " A"}',
      '   ',
      '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, '
        .. '{"role": "assistant", "content": "a"}]}',
    }, "\n")
    assert.are.equal(3, files.validate_jsonl(text))
    assert.are.equal(1, files.validate_jsonl('{"text": "x"}\r\n'))
  end)

  local bad = {
    { '{"text": "x"}\n{"text": ', "line 2: invalid JSON" },
    { '{"text": "x"}\n\n[1, 2]', "line 3: expected a JSON object, got an array" },
    { '{"foo": 1}', "line 1: expected \"messages\", \"prompt\" and \"completion\", or \"text\"" },
    { '{"text": "x", "prompt": "y", "completion": "z"}', "line 1: use one of" },
    { '{"text": 5}', "line 1: 'text' must be a string" },
    { '{"text": ""}', "line 1: 'text' is empty" },
    { '{"prompt": "a"}', "line 1: 'completion' must be a string" },
    { '{"prompt": 1, "completion": "b"}', "line 1: 'prompt' must be a string" },
    { '{"messages": {}}', "line 1: 'messages' is empty" },
    { '{"messages": "hi"}', "line 1: 'messages' must be an array" },
    { '{"messages": [{"role": "user", "content": "u"}]}', "line 1: 'messages' has no assistant message" },
    { '{"messages": [{"role": "robot", "content": "u"}]}', "line 1: messages[0].role 'robot' is not one of" },
    { '{"messages": [{"role": "user", "content": "u"}, {"role": "assistant"}]}',
      "line 1: messages[1].content must be a string" },
    { '{"messages": [5]}', "line 1: messages[0] must be an object" },
    { "\n\n", "the file holds no examples" },
  }
  for _, c in ipairs(bad) do
    it("refuses " .. c[1]:gsub("\n", "\\n") .. " naming " .. c[2], function()
      local n, err = files.validate_jsonl(c[1])
      assert.is_nil(n)
      assert.matches(c[2], err, 1, true)
    end)
  end
end)
