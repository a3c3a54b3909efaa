-- Returns a plan that names requests that do not exist.
local P
return {
  init = function(ctx) P = ctx.plan end,
  schedule = function()
    P.items[0].request, P.items[0].tokens = 100000, 5
    P.n_items = 1
  end,
}
