-- Allocates without bound, a megabyte at a time.
local keep = {}
return { schedule = function() while true do keep[#keep + 1] = string.rep("x", 1048576 + #keep) end end }
