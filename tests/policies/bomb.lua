-- Grows a table without bound.
return {
  schedule = function()
    local t = {}
    while true do t[#t + 1] = { #t } end
  end,
}
