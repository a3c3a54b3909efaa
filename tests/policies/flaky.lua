-- Fails when the runtime's iteration counter is negative, succeeds otherwise.
local S
return {
  init = function(ctx) S = ctx.state end,
  schedule = function()
    if S.iteration < 0 then error("asked to fail") end
  end,
}
