-- Raises on every call.
return { schedule = function() error("this policy always fails") end }
