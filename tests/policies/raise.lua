-- Raises from a helper, so the traceback has a frame in this file.
local function check_budget()
  error("policy broke on purpose")
end

return {
  schedule = function() check_budget() end,
  export_state = function() return { f = print } end,
}
