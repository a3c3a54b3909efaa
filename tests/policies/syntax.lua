-- A syntax error on line 3.
local M = {}
M.schedule = function() return 1 +* 2 end
return M
