-- Tries to turn the JIT back on (compiled loops skip debug hooks) and to remove the
-- host's hook, then never returns.
return {
  schedule = function()
    pcall(jit.on)
    pcall(debug.sethook)
    local x = 0
    while true do x = x + 1 end
  end,
}
